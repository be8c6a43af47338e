"""fp8 W8A8 matmul on Hopper: activations quantized per row on the fly, then ``torch._scaled_mm``.

The weight is float8_e4m3fn [N, K] with one float32 scale per output row; each activation row
gets its own scale (absmax / 448), so the product runs on the fp8 tensor cores and the two
scales are applied to the fp32 accumulator (row-wise scaling, cuBLASLt).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [..., K] (bf16/fp16) @ fp8 weight [N, K]^T, times scale [N] -> [..., N] in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    x_scale = x2.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX  # [M, 1]
    xq = (x2 / x_scale).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale, scale_b=scale.float().view(1, -1), out_dtype=x.dtype
    )  # weight.t(): [K, N] column-major, as cuBLASLt wants it
    return out.reshape(*shape[:-1], weight.shape[0])
