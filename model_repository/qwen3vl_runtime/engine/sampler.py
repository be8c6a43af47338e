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
    top_k = [min(p.top_k, vocab) if p.top_k else vocab for p in params]  # vocab: no cut
    # The rows' settings in one copy to the device (this runs every step).
    settings = to_device(torch.tensor([[p.temperature, k, p.top_p] for p, k in zip(params, top_k)], dtype=torch.float32), logits.device)
    temperature, k_row, top_p = settings.unbind(1)
    scaled = logits / temperature[:, None]
    cut = [k < vocab for k in top_k]
    largest = kth = None
    if any(cut):
        largest = torch.topk(scaled, max(k for k, c in zip(top_k, cut) if c), dim=-1)  # [S, k], descending
        index = (k_row.long() - 1).clamp_(max=largest.values.shape[1] - 1)
        kth = torch.where(k_row < vocab, largest.values.gather(1, index[:, None]).squeeze(1), float("-inf"))
        scaled = scaled.masked_fill(scaled < kth[:, None], float("-inf"))
    nucleus = [p.top_p < 1 for p in params]
    if any(nucleus):
        if all(c for c, n in zip(cut, nucleus) if n):  # the generation config's case: no sort
            keep = _nucleus_of_top_k(scaled, largest, kth, top_p)
        else:
            keep = _nucleus_by_sort(scaled, top_p)
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
