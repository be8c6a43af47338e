"""Next-token choice for a batch: greedy rows by one argmax, the sampled rows filtered and drawn
together.

Sampling is what a request gets by default: Qwen3-VL's generation config asks for temperature
0.7, top-k 20, top-p 0.8. The sampled rows go through one batched pass (temperature, the top-k
cut, the top-p nucleus from one sort of all rows, a softmax, an inverse-CDF draw), a fixed number
of kernels whatever the batch; row by row it was about twelve kernels and a sort of the 151,936
logits per sampled row and step. Each sequence keeps its own generator (a seed makes its tokens
reproducible), on the host: its uniform draw per step travels with the other inputs, no kernel
launched per row.
"""

from __future__ import annotations

import torch

from ..host_to_device import to_device
from .request import SamplingParams


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits: [S, vocab] float32 -> each row temperature-scaled, with its top-k / top-p tail set
    to -inf, as transformers' warpers do: top-k keeps every logit tied with the k-th; top-p keeps
    the fewest top logits (in the sort's order) whose probabilities reach top_p, always the first."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = to_device(torch.tensor([p.temperature for p in params], dtype=torch.float32), device)
    scaled = logits / temperature[:, None]
    top_k = [min(p.top_k, vocab) if p.top_k else vocab for p in params]
    if min(top_k) < vocab:
        largest = torch.topk(scaled, max(k for k in top_k if k < vocab), dim=-1).values  # [S, k], descending
        cut = [k < vocab for k in top_k]  # rows without a cut keep everything
        index = to_device(torch.tensor([k - 1 if c else 0 for k, c in zip(top_k, cut)]), device)
        kth = largest.gather(1, index[:, None]).squeeze(1)
        kth = torch.where(to_device(torch.tensor(cut), device), kth, float("-inf"))
        scaled = scaled.masked_fill(scaled < kth[:, None], float("-inf"))
    if any(p.top_p < 1 for p in params):
        top_p = to_device(torch.tensor([p.top_p for p in params], dtype=torch.float32), device)
        ordered, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
        probs = ordered.softmax(-1)
        # Drop a token once the ones before it already reach top_p (the first always stays); rows
        # without a nucleus (top_p 1) drop nothing, though their sums may round up to 1 early.
        drop = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1)[:, None]
        scaled = torch.empty_like(scaled).scatter_(1, order, ordered.masked_fill(drop, float("-inf")))
    return scaled


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
