"""The vision tower's rotary embedding of q and k in one kernel (Triton).

transformers' ``apply_rotary_pos_emb_vision`` computes in float32: for each of q and k it casts up,
multiplies by cos, builds ``rotate_half`` (a negation and a ``cat``), multiplies by sin, adds and
casts back: fourteen elementwise kernels per layer over [patches, heads, head_dim] float32. Here
q and k are read once from the fused qkv projection and written once, in the same float32 math
rounded once to the tower's dtype, as transformers rounds. Sixteen 448 px images' bf16 tower went
from 36.1 to 24.1 ms on the H200 (scripts/profile_prefill.py --prompts 16, runs 9 and 12).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _vision_rope_kernel(QKV, Cos, Sin, Out, stride_qkv, stride_cos, rows, HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    which = tl.program_id(1)  # 0: q, 1: k (v is not rotated)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < HEADS
    at = QKV + row * stride_qkv + which * HEADS * 2 * HALF + h * 2 * HALF + d
    x1 = tl.load(at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(at + HALF, mask=mask, other=0.0).to(tl.float32)
    # Both halves of the tower's cos and sin are equal (its frequencies are laid out twice).
    cos = tl.load(Cos + row * stride_cos + d).to(tl.float32)
    sin = tl.load(Sin + row * stride_cos + d).to(tl.float32)
    # q * cos + rotate_half(q) * sin, rotate_half(q) = (-x2, x1)
    out = Out + (which * rows + row) * HEADS * 2 * HALF + h * 2 * HALF + d
    tl.store(out, (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=mask)
    tl.store(out + HALF, (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=mask)


def vision_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv: [N, 3, H, D] (a view of the tower's qkv projection, rows contiguous); cos, sin: [N, D]
    float32 -> (q, k) rotated, [N, H, D] each in qkv's dtype, as ``apply_rotary_pos_emb_vision``."""
    n, three, heads, head_dim = qkv.shape
    if three != 3 or qkv.stride(3) != 1 or qkv.stride(2) != head_dim or qkv.stride(1) != heads * head_dim:
        raise ValueError(f"vision_rope: expected a [N, 3, H, D] view of a contiguous qkv row, got shape {tuple(qkv.shape)} strides {qkv.stride()}")
    if cos.shape != (n, head_dim) or sin.shape != cos.shape or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError(f"vision_rope: cos and sin must be [N, D] with contiguous rows, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    out = torch.empty((2, n, heads, head_dim), device=qkv.device, dtype=qkv.dtype)
    _vision_rope_kernel[(n, 2)](
        qkv, cos, sin, out, qkv.stride(0), cos.stride(0), n,
        HEADS=heads, HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(heads),
    )  # fmt: skip
    return out[0], out[1]
