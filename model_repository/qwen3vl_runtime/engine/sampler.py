"""Next-token choice for a batch: greedy rows by one argmax, the sampled rows filtered and drawn
together.

Sampling is what a request gets by default: Qwen3-VL's generation config asks for temperature
0.7, top-k 20, top-p 0.8. The sampled rows go through one batched pass (temperature, the top-k
cut, the top-p nucleus, a softmax, an inverse-CDF draw), a fixed number of kernels whatever the
batch; row by row it was about twelve kernels and a sort of the 151,936 logits per sampled row
and step. Where every nucleus row also has a top-k cut (the default) the nucleus is found among
the top k without sorting the vocabulary; otherwise one sort of all rows. Each sequence keeps its
own generator (a seed makes its tokens reproducible), on the host: its uniform draw per step
travels with the other inputs, no kernel launched per row.
"""

from __future__ import annotations

import torch

from ..host_to_device import to_device
from .request import SamplingParams


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits: [S, vocab] float32 -> each row temperature-scaled, with its top-k / top-p tail set
    to -inf, as transformers' warpers do: top-k keeps every logit tied with the k-th; top-p keeps
    the fewest top logits whose probabilities reach top_p, always the first (of logits tied at the
    boundary, as many as that needs)."""
    vocab = logits.shape[-1]
    top_k = [_cut(p, vocab) for p in params]
    # The rows' settings in one copy to the device (this runs every step).
    settings = to_device(torch.tensor([[p.temperature, k, p.top_p] for p, k in zip(params, top_k)], dtype=torch.float32), logits.device)
    cut = [k < vocab for k in top_k]
    nucleus = [p.top_p < 1 for p in params]
    k_max = max((k for k, c in zip(top_k, cut) if c), default=0)
    mode = None
    if any(nucleus):  # the generation config's case (every nucleus row cut to its top k): no sort
        mode = "top_k" if all(c for c, n in zip(cut, nucleus) if n) else "sort"
    return filter_rows(logits, settings, k_max, mode)


def _cut(params: SamplingParams, vocab: int) -> int:
    """The row's top-k as the filters read it: the vocabulary where there is no cut."""
    return min(params.top_k, vocab) if params.top_k else vocab


def filter_rows(logits: torch.Tensor, settings: torch.Tensor, k_max: int, nucleus: str | None) -> torch.Tensor:
    """``filter_logits`` from device tensors alone (no host read: a CUDA graph can hold it).

    settings: [S, 3+] float32 per row: temperature, top_k (the vocabulary: no cut), top_p (1: no
    nucleus). k_max >= every row's top_k below the vocabulary (0: no row is cut). nucleus: "top_k"
    where every row with top_p < 1 is cut, "sort" otherwise, None where no row has top_p < 1."""
    vocab = logits.shape[-1]
    temperature, k_row, top_p = settings[:, 0], settings[:, 1], settings[:, 2]
    scaled = logits / temperature[:, None]
    largest = kth = None
    if k_max:
        largest = torch.topk(scaled, k_max, dim=-1)  # [S, k_max], descending
        index = (k_row.long() - 1).clamp_(max=k_max - 1)
        kth = torch.where(k_row < vocab, largest.values.gather(1, index[:, None]).squeeze(1), float("-inf"))
        scaled = scaled.masked_fill(scaled < kth[:, None], float("-inf"))
    if nucleus is not None:
        keep = _nucleus_of_top_k(scaled, largest, kth, top_p) if nucleus == "top_k" else _nucleus_by_sort(scaled, top_p)
        scaled = scaled.masked_fill(~keep & (top_p < 1)[:, None], float("-inf"))
    return scaled


def _nucleus_by_sort(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep mask [S, vocab]: a logit stays until the ones sorted before it reach top_p."""
    ordered, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    probs = ordered.softmax(-1)
    keep = probs.cumsum(-1) - probs < top_p[:, None]  # the first always stays: 0 < top_p
    return torch.empty_like(keep).scatter_(1, order, keep)


def _nucleus_of_top_k(scaled: torch.Tensor, top, kth: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The same keep mask without sorting the vocabulary, for rows already cut to their top k.

    Every logit above the k-th is among ``top`` (``torch.topk``'s k_max largest, descending), where
    a running sum decides as the sort would. The logits tied with the k-th (possibly more
    than k_max of them) all have one probability, so the sum reaches top_p after a number of them
    that is computed, not walked: that many stay, the first in vocabulary order. A row where no
    logit is above the k-th keeps at least its first tie."""
    log_total = scaled.logsumexp(-1, keepdim=True)
    above = (scaled > kth[:, None]).sum(-1, keepdim=True)  # [S, 1]: all of them are in `top`
    top_probs = (top.values - log_total).exp()  # past `above` not needed, and masked next
    position = torch.arange(top.values.shape[1], device=scaled.device)[None, :]
    top_probs = top_probs.masked_fill(position >= above, 0.0)  # only the logits above the k-th
    before = top_probs.cumsum(-1) - top_probs
    keep_top = (before < top_p[:, None]) & (position < above)
    keep = torch.zeros_like(scaled, dtype=torch.bool).scatter_(1, top.indices, keep_top)
    mass_above = top_probs.sum(-1)
    tie_prob = (kth - log_total[:, 0]).exp()
    # The r-th tie stays while mass_above + r * tie_prob < top_p. A quotient within 1e-3 of a whole
    # number (a flat row, top_p times the ties a whole number) is taken as that number: the float
    # division must not keep one more than the exact sum would.
    ties_kept = ((top_p - mass_above) / tie_prob - 1e-3).ceil().clamp(min=0)
    ties_kept = torch.where(above[:, 0] == 0, ties_kept.clamp(min=1), ties_kept)
    tied = scaled == kth[:, None]
    keep |= tied & (tied.cumsum(-1) <= ties_kept[:, None])
    return keep


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs: [S, vocab] (rows summing to ~1), uniforms: [S] in [0, 1) -> [S] int64: per row the
    token whose cumulative probability first exceeds its uniform (a zero-probability token never)."""
    cumulative = probs.cumsum(-1)
    target = uniforms[:, None] * cumulative[:, -1:]  # the row's own total: rounding never runs past it
    return torch.searchsorted(cumulative, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: [B, vocab] -> one token id per row, [B] int64 on the logits' device (no host sync).
    generators: a host generator per sampled row (None for greedy rows)."""
    tokens = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        uniforms = torch.stack([torch.rand((), generator=generators[i]) for i in sampled])
        rows = to_device(torch.tensor(sampled), logits.device)
        probs = filter_logits(logits[rows].float(), [params[i] for i in sampled]).softmax(-1)
        tokens[rows] = draw(probs, to_device(uniforms, logits.device))
    return tokens


# Rows a graph samples: greedy, top_k in 1..GRAPH_TOP_K, or neither a top-k cut nor a nucleus.
# The generation config's top_k is 20.
GRAPH_TOP_K = 64
# Decode batches up to this many rows sample from a graph. On the H200 the graph took 0.36 / 0.91 /
# 2.11 ms per step at 1 / 8 / 64 rows, the eager sampler 1.20 / 1.48 / 1.96 (bench_sampler.py
# --device cuda, run 14); at 64 streams the engine made 9,610 tok/s graphed against 10,879 eager
# (bench_engine.py --sampled). At 64 rows the work itself is the cost, not its launches (not
# profiled: the graph's top-k of 64 against the eager one's 20 is a suspect).
GRAPH_MAX_ROWS = 8
# The host's row of a decode step's sampling inputs: temperature, top_k, top_p, uniform, greedy.
SETTINGS = 5
PADDING_ROW = (1.0, 1.0, 1.0, 0.0, 1.0)  # a padding row of a graph's bucket: greedy


def graphable(params: list[SamplingParams]) -> bool:
    """Whether ``sample_graphed`` samples every row as ``sample`` would."""
    return all(p.greedy or 1 <= p.top_k <= GRAPH_TOP_K or (p.top_k == 0 and p.top_p == 1) for p in params)


def graph_settings(params: list[SamplingParams], generators: list[torch.Generator | None], rows: int, vocab: int) -> torch.Tensor:
    """[rows, SETTINGS] float32 on the host for ``sample_graphed``: the params' rows (each sampled
    row's uniform drawn from its generator, as ``sample`` draws it), then padding rows."""
    settings = [PADDING_ROW if p.greedy else (p.temperature, _cut(p, vocab), p.top_p, float(torch.rand((), generator=g)), 0.0)
                for p, g in zip(params, generators)]  # fmt: skip
    return torch.tensor(settings + [PADDING_ROW] * (rows - len(settings)), dtype=torch.float32)


def sample_graphed(logits: torch.Tensor, settings: torch.Tensor) -> torch.Tensor:
    """Every row of logits [B, vocab] sampled from device settings [B, SETTINGS] with fixed shapes
    and no host read (the graphed sampler's body): greedy rows by argmax, the others as
    ``sample`` samples them (``graphable`` rows)."""
    probs = filter_rows(logits.float(), settings, GRAPH_TOP_K, "top_k").softmax(-1)
    return torch.where(settings[:, 4] > 0, logits.argmax(-1), draw(probs, settings[:, 3]))
