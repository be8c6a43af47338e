"""Fused elementwise kernels of a decoder layer (Triton).

Written one op at a time, a decode step is ~55 small kernels per layer; on the H100, with CUDA
graphs, that step took 4.62 ms per token at batch 1, and 2.12 ms with these kernels (9 per
layer; scripts/bench_engine.py, docs/benchmarks.md). Each does a group of elementwise work in one
pass, rounding where transformers rounds (bf16 after the residual add, after normalising, after SiLU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kv_cache import LayerCache
from .pdl import launch_args, wait_for_previous


@triton.jit
def _add_rmsnorm_kernel(X, Delta, W, Out, Res, stride, N, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        delta = tl.load(Delta + row * stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)  # the residual stream, in its dtype
        tl.store(Res + row * stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    normed = (xf * tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)).to(x.dtype)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(Out + row * stride + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=mask)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """x, delta: [M, N] -> (rmsnorm(x + delta) * weight, x + delta); without delta, x is returned."""
    m, n = x.shape
    out = torch.empty_like(x)
    residual = torch.empty_like(x) if delta is not None else x
    _add_rmsnorm_kernel[(m,)](
        x, delta if delta is not None else x, weight, out, residual, x.stride(0), n, eps,
        HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(n), **launch_args(x),
    )  # fmt: skip
    return out, residual


@triton.jit
def _quantized(x1, x2):
    """Head vectors as two halves [BLOCK_H, HALF] -> their int8 halves and scales [BLOCK_H, 1],
    as ``kv_cache.quantize``: absmax / 127 per vector, x * (127 / absmax) + 0.5 floored."""
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(f1), 1), tl.max(tl.abs(f2), 1))[:, None]
    inv = 127.0 / tl.maximum(absmax, 1e-30)
    q1 = tl.minimum(tl.maximum(tl.floor(f1 * inv + 0.5), -127.0), 127.0).to(tl.int8)
    q2 = tl.minimum(tl.maximum(tl.floor(f2 * inv + 0.5), -127.0), 127.0).to(tl.int8)
    return q1, q2, absmax / 127.0


@triton.jit
def _qk_norm_rope_cache_kernel(
    QKV, QNormW, KNormW, Cos, Sin, Q, KCache, VCache, KScale, VScale, Slots, Positions, KOut, VOut,
    stride_qkv, stride_cos, stride_q, stride_ks, stride_kh, stride_kl, stride_ss, stride_sh,
    eps, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    KEEP_KV: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """BLOCK_H heads of one row (query heads, then key heads, then value heads), each two halves of
    HALF: the first and second halves of rotate_half. QUANT: the cache is int8, with a scale per
    (token, KV head) in KScale / VScale [slots, KV heads, max_len]. The kept keys and values
    (KEEP_KV) are the cache's, dequantized: a prefill attends over what later steps read."""
    wait_for_previous(PDL)
    row = tl.program_id(0)
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    d = tl.arange(0, HALF)[None, :]  # [1, HALF]
    is_q = head < HEADS
    is_k = (head >= HEADS) & (head < HEADS + KV_HEADS)
    is_v = (head >= HEADS + KV_HEADS) & (head < HEADS + 2 * KV_HEADS)
    base = QKV + row * stride_qkv + head * 2 * HALF
    x1 = tl.load(base + d, mask=is_q | is_k | is_v, other=0.0)
    x2 = tl.load(base + HALF + d, mask=is_q | is_k | is_v, other=0.0)
    slot = tl.load(Slots + row).to(tl.int64)
    position = tl.load(Positions + row).to(tl.int64)
    kv_head = head - HEADS  # key heads: 0..KV_HEADS-1; value heads: KV_HEADS..
    cache = slot * stride_ks + position * stride_kl
    scale_at = slot * stride_ss + position
    # Value heads go straight into the cache.
    v1, v2 = x1, x2
    if QUANT:
        v1, v2, v_scale = _quantized(x1, x2)
        tl.store(VScale + scale_at + (kv_head - KV_HEADS) * stride_sh, v_scale, mask=is_v)
    tl.store(VCache + cache + (kv_head - KV_HEADS) * stride_kh + d, v1, mask=is_v)
    tl.store(VCache + cache + (kv_head - KV_HEADS) * stride_kh + HALF + d, v2, mask=is_v)
    # Query and key heads: RMSNorm over the head, then the rotary embedding.
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    inv = tl.rsqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1))[:, None] / (2 * HALF) + eps)
    w1 = tl.where(is_q, tl.load(QNormW + d).to(tl.float32), tl.load(KNormW + d).to(tl.float32))
    w2 = tl.where(is_q, tl.load(QNormW + HALF + d).to(tl.float32), tl.load(KNormW + HALF + d).to(tl.float32))
    n1 = (w1 * (f1 * inv).to(x1.dtype).to(tl.float32)).to(x1.dtype).to(tl.float32)
    n2 = (w2 * (f2 * inv).to(x1.dtype).to(tl.float32)).to(x1.dtype).to(tl.float32)
    cos = tl.load(Cos + row * stride_cos + d).to(tl.float32)  # both halves of cos/sin are equal
    sin = tl.load(Sin + row * stride_cos + d).to(tl.float32)
    # rotate_half(x) = (-x2, x1); products rounded like transformers' q * cos + rotate_half(q) * sin
    r1 = ((n1 * cos).to(x1.dtype).to(tl.float32) + (-n2 * sin).to(x1.dtype).to(tl.float32)).to(x1.dtype)
    r2 = ((n2 * cos).to(x1.dtype).to(tl.float32) + (n1 * sin).to(x1.dtype).to(tl.float32)).to(x1.dtype)
    out = Q + row * stride_q + head * 2 * HALF
    tl.store(out + d, r1, mask=is_q)
    tl.store(out + HALF + d, r2, mask=is_q)
    k1, k2 = r1, r2
    if QUANT:
        k1, k2, k_scale = _quantized(r1, r2)
        tl.store(KScale + scale_at + kv_head * stride_sh, k_scale, mask=is_k)
    tl.store(KCache + cache + kv_head * stride_kh + d, k1, mask=is_k)
    tl.store(KCache + cache + kv_head * stride_kh + HALF + d, k2, mask=is_k)
    if KEEP_KV:  # each key and value head once per query head of its group: [rows, HEADS, 2 * HALF]
        if QUANT:  # as the cache holds them (kv_cache.LayerCache.read)
            k1, k2 = (k1.to(tl.float32) * k_scale).to(x1.dtype), (k2.to(tl.float32) * k_scale).to(x1.dtype)
            v1, v2 = (v1.to(tl.float32) * v_scale).to(x1.dtype), (v2.to(tl.float32) * v_scale).to(x1.dtype)
        group = HEADS // KV_HEADS
        for g in tl.static_range(HEADS // KV_HEADS):
            kept_k = KOut + (row * HEADS + kv_head * group + g) * 2 * HALF
            tl.store(kept_k + d, k1, mask=is_k)
            tl.store(kept_k + HALF + d, k2, mask=is_k)
            kept_v = VOut + (row * HEADS + (kv_head - KV_HEADS) * group + g) * 2 * HALF
            tl.store(kept_v + d, v1, mask=is_v)
            tl.store(kept_v + HALF + d, v2, mask=is_v)


# Rows above this (a prefill) take every head of a row in one program. One program per (row, head)
# was 151 us a layer for a sixteen-prompt prefill of 3,888 rows on the H200 (124k programs of 128
# values each; scripts/profile_prefill.py, run 13); decode steps keep that grid.
ONE_HEAD_MAX_ROWS = 64


def qk_norm_rope_cache(qkv, q_norm_w, k_norm_w, eps, cos, sin, cache: LayerCache, slots, positions, heads, kv_heads, keep_kv=False):
    """qkv: [M, (H + 2 Hkv) * D] -> (q, k, v): q [M, H, D] normed and rotated; k (normed, rotated)
    and v go straight into the layer's cache at (slots[i], head, positions[i]), quantized if it is
    int8 (``kv_cache``). cos, sin: [M, D].
    keep_kv: also return this step's k and v, each head repeated for the query heads of its group,
    [M, H, D] each (else None): a prefill attends over them without gathering them back from the
    cache (56 gathers, 1.4 ms of a 16-prompt prefill on the H200, run 12) or repeating them for
    grouped-query attention (56 copies, 1.44 ms, run 13; scripts/profile_prefill.py)."""
    m = qkv.shape[0]
    k_cache, v_cache = cache.k, cache.v
    head_dim = k_cache.shape[-1]
    k_scale, v_scale = cache.kernel_scales()
    q = torch.empty((m, heads, head_dim), device=qkv.device, dtype=qkv.dtype)
    k = v = None
    if keep_kv:
        k, v = (torch.empty((m, heads, head_dim), device=qkv.device, dtype=qkv.dtype) for _ in range(2))
    all_heads = heads + 2 * kv_heads
    block_h = 1 if m <= ONE_HEAD_MAX_ROWS else triton.next_power_of_2(all_heads)
    _qk_norm_rope_cache_kernel[(m, triton.cdiv(all_heads, block_h))](
        qkv, q_norm_w, k_norm_w, cos, sin, q, k_cache, v_cache, k_scale, v_scale, slots, positions,
        *((k, v) if keep_kv else (q, q)),  # without keep_kv the kernel stores nothing there
        qkv.stride(0), cos.stride(0), q.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_scale.stride(0), k_scale.stride(1),
        eps, HEADS=heads, KV_HEADS=kv_heads, HALF=head_dim // 2, BLOCK_H=block_h, KEEP_KV=keep_kv, QUANT=cache.quantized, **launch_args(qkv),
    )  # fmt: skip
    return q, k, v


@triton.jit
def _silu_mul_kernel(X, Out, stride_x, stride_o, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(Out + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[M, 2I] (gate then up) -> silu(gate) * up: [M, I]."""
    m, two_i = gate_up.shape
    n = two_i // 2
    out = torch.empty((m, n), device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(m, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block, **launch_args(gate_up))
    return out


@triton.jit
def _fp8_rows_kernel(X, Q, Scale, stride_x, stride_q, K, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-12) / FP8_MAX
    tl.store(Scale + row, scale)
    tl.store(Q + row * stride_q + cols, (x / scale).to(Q.dtype.element_ty), mask=mask)


def fp8_rows(x: torch.Tensor, fp8_max: float = 448.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (float8_e4m3fn [M, K], float32 scale [M, 1]) with one scale per row."""
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    _fp8_rows_kernel[(m,)](x, q, scale, x.stride(0), q.stride(0), k, FP8_MAX=fp8_max, BLOCK=triton.next_power_of_2(k), **launch_args(x))
    return q, scale
