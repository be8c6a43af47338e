"""Next-token choice for a batch: greedy rows by one argmax, sampled rows with their own generator."""

from __future__ import annotations

import torch

from .request import SamplingParams


def filter_logits(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """row: [vocab] float32 -> temperature-scaled logits with the top-k / top-p tail set to -inf."""
    row = row / params.temperature
    if params.top_k:
        kth = torch.topk(row, min(params.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(row, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the ones before it already reach top_p (the first always stays).
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p
        row = row.scatter(0, order[drop], float("-inf"))
    return row


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: [B, vocab] -> one token id per row, [B] int64 on the logits' device (no host sync)."""
    tokens = logits.argmax(-1)
    for i, p in enumerate(params):
        if not p.greedy:
            probs = filter_logits(logits[i].float(), p).softmax(-1)
            tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return tokens
