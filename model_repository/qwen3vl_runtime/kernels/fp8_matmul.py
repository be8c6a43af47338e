"""fp8 matmul on Hopper: W8A8 through ``torch._scaled_mm`` for prefills, the measured fastest for decode.

The weight is float8_e4m3fn [N, K] with one float32 scale per output row; each activation row
gets its own scale (absmax / 448), so the product runs on the fp8 tensor cores and the two
scales are applied to the fp32 accumulator (row-wise scaling, cuBLASLt).
"""

from __future__ import annotations

import torch

from .fused import fp8_rows
from .int8_matmul import DECODE_MAX_ROWS
from .int8_matmul import int8_matmul as weight_only_matmul


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] (bf16/fp16) @ fp8 weight [N, K]^T, times scale [N] (+ bias [N]) -> [..., N] in x's dtype.

    Decode-sized products go to the weight-only kernels, whose tuner also measures ``w8a8_matmul``
    from 16 rows (below that cuBLASLt's 128-wide fp8 tiles mostly compute padding)."""
    shape = x.shape
    if x.numel() // shape[-1] <= DECODE_MAX_ROWS:
        return weight_only_matmul(x, weight, scale, bias)
    out = w8a8_matmul(x.reshape(-1, shape[-1]), weight, scale)
    return (out if bias is None else out + bias.to(x.dtype)).reshape(*shape[:-1], weight.shape[0])


def w8a8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [M, K] quantized per row to fp8, then the fp8 tensor cores -> [M, N] in x's dtype."""
    xq, x_scale = fp8_rows(x)  # [M, K] fp8, [M, 1] float32
    # weight.t(): [K, N] column-major, as cuBLASLt wants it
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.float().view(1, -1), out_dtype=x.dtype)
