"""Attention within segments laid end to end (images' patches, prompts' tokens), one batch per size.

Segments of equal length are gathered into one [segments, heads, length, head_dim] batch: one
SDPA call per distinct length (flash attention on the GPU), whatever the number of segments. The
vision tower attends within each image this way; the decoder's batched prefill within each prompt
(causal). On the H100 a prefill of 16 prompts attending one by one made ~450 SDPA calls and most
of its 375 ms were launch overhead (scripts/profile_prefill.py).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from .host_to_device import to_device


class SegmentAttention:
    """causal: each position attends to its segment's earlier positions only (a prompt)."""

    def __init__(self, lengths: list[int], device: torch.device, causal: bool = False):
        self.causal = causal
        starts = defaultdict(list)
        offset = 0
        for n in lengths:
            starts[n].append(offset)
            offset += n
        if len(starts) == 1:  # the common case (one size): a view of q, k, v, no gather or scatter
            (n, first), = starts.items()
            self.shape, self.groups = (len(first), n), []
        else:  # per distinct length: the row indices of its segments, [segments, length]
            self.shape = None
            self.groups = [to_device(torch.tensor(first)[:, None] + torch.arange(n), device) for n, first in starts.items()]

    def __call__(self, q, k, v, scale: float | None = None) -> torch.Tensor:
        """q, k, v: [rows, heads, head_dim]. Grouped-query keys and values come repeated per query
        head (``qk_norm_rope_cache(keep_kv=True)`` writes them so): SDPA's enable_gqa has no flash
        kernel on the GPU machine's torch."""
        if self.shape is not None:
            return self._attend(q, k, v, scale, self.shape).reshape(q.shape)
        out = torch.empty_like(q)
        for index in self.groups:
            out[index] = self._attend(q[index], k[index], v[index], scale, index.shape)
        return out

    def _attend(self, q, k, v, scale, shape) -> torch.Tensor:
        segments, n = shape
        q, k, v = (t.reshape(segments, n, *t.shape[-2:]).transpose(1, 2) for t in (q, k, v))  # [S, H, n, hd]
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=self.causal).transpose(1, 2)  # [S, n, H, hd]
