"""fp8 matmul on Hopper: W8A8 through ``torch._scaled_mm`` for batches, weight-only for a few rows.

The weight is float8_e4m3fn [N, K] with one float32 scale per output row; each activation row
gets its own scale (absmax / 448), so the product runs on the fp8 tensor cores and the two
scales are applied to the fp32 accumulator (row-wise scaling, cuBLASLt).
"""

from __future__ import annotations

import torch

from .fused import fp8_rows
from .int8_matmul import int8_matmul as weight_only_matmul

# Below this many rows cuBLASLt's fp8 tiles (128 wide) mostly compute padding; a weight-only
# kernel (fp8 weights dequantized in registers, bf16 math) reads the same bytes in less time.
W8A8_MIN_ROWS = 32


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [..., K] (bf16/fp16) @ fp8 weight [N, K]^T, times scale [N] -> [..., N] in x's dtype."""
    shape = x.shape
    if x.numel() // shape[-1] < W8A8_MIN_ROWS:
        return weight_only_matmul(x, weight, scale)
    xq, x_scale = fp8_rows(x.reshape(-1, shape[-1]))  # [M, K] fp8, [M, 1] float32
    out = torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale, scale_b=scale.float().view(1, -1), out_dtype=x.dtype
    )  # weight.t(): [K, N] column-major, as cuBLASLt wants it
    return out.reshape(*shape[:-1], weight.shape[0])
