"""fp8 W8A8 matmul on Hopper: activations quantized per row on the fly, then ``torch._scaled_mm``.

The weight is float8_e4m3fn [N, K] with one float32 scale per output row; each activation row
gets its own scale (absmax / 448), so the product runs on the fp8 tensor cores and the two
scales are applied to the fp32 accumulator (row-wise scaling, cuBLASLt).
"""

from __future__ import annotations

import torch

from .fused import fp8_rows


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [..., K] (bf16/fp16) @ fp8 weight [N, K]^T, times scale [N] -> [..., N] in x's dtype."""
    shape = x.shape
    xq, x_scale = fp8_rows(x.reshape(-1, shape[-1]))  # [M, K] fp8, [M, 1] float32
    out = torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale, scale_b=scale.float().view(1, -1), out_dtype=x.dtype
    )  # weight.t(): [K, N] column-major, as cuBLASLt wants it
    return out.reshape(*shape[:-1], weight.shape[0])
