"""Weight-only 8-bit matmul: y = x @ dequant(W)^T with the dequantization fused into the kernel.

W stays 8-bit in memory (int8 or float8_e4m3fn, [out, in], one float32 scale per output row): a
decode step reads half the bytes of bf16 weights, which pays only where the kernel keeps up with
the memory. The scale multiplies the fp32 accumulator once per output. With the weights converted
in the kernel (to bf16 or fp16 operands) the 64-row products stayed behind cuBLAS bf16 (H200, run
19, scripts/bench_decode_matmul.py: 1.644 against 1.390 ms a token; a sweep of 152-176 tiles a
shape found none that closed it). Splitting x into two int8 terms instead ("int8x2",
``_two_term_kernel``), so that W's bytes go to the int8 MMA as loaded: 0.849 / 0.965 / 1.001 /
1.375 ms at 1 / 4 / 16 / 64 rows against cuBLAS bf16's 1.34-1.39, and 1.328 against 1.424 at 64
rows with the int8x2 sweep's tile for down (run 20, the same script).

Computing the down projection's input, silu(gate) * up, inside these kernels (one launch fewer
per layer) was tried and taken out: on the H200 it tied the two launches in the few-rows kernel
(10.4 against 10.5 us at one row) and lost in the tensor-core one (92-129 us against 16-21; run
12, scripts/bench_decode_matmul.py at commit e25e97a).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache

import torch
import triton
import triton.language as tl

from .pdl import launch_args, wait_for_previous

# Decode batches are at most this size; above it (a prefill, an image's patches) the product moves
# towards the tensor cores' bound. There the bf16-conversion kernel below, even given 128-256-row
# tiles, took about twice bf16's time at 784-4,096 rows (H100, scripts/bench_matmul.py, run 5),
# and dequantizing W for the call then cuBLAS ("dequantize") cut the engine's prefill at 64
# streams from 16.7 to 9.1 ms per step (bench_engine.py, run 6; docs/benchmarks.md); but that
# writes and reads W in bf16 each call: 1.5 ms of a one-prompt int8 prefill (H200, run 12), where
# bf16 weights need none. The int8x2 kernel reads W as it is, so prefill sizes are tuned too, with
# "dequantize" among the candidates and their default (``candidates``), but only inside
# ``tuning_prefills`` (the runner's start-up): tuning a size first seen while serving (the vision
# tower's) would stall that request for the whole measurement.
DECODE_MAX_ROWS = 64
# Weights too large to copy per call (the tied lm_head: 622 MB in bf16) are never dequantized;
# they only ever see a few rows (each prompt's last).
DEQUANTIZE_MAX_ELEMENTS = 64 << 20
# int8x2 tiles for prefill sizes, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): a first guess, not
# swept; BLOCK_K is the terms' group, so at most TERMS_MAX_GROUP.
PREFILL_TERMS_TILES = [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (64, 256, 128, 8, 3), (128, 64, 128, 4, 4)]
_tune_prefills = False  # set inside ``tuning_prefills``

# How the tensor-core kernels turn a weight tile into MMA operands (constexpr CONVERT; the
# "int8x2" launches do not convert it and run ``_two_term_kernel`` instead):
#   "bf16": Triton's own conversion to x's dtype (int8: an int-to-float instruction per element);
#   "f16_bits" (int8): exact fp16 from the byte's bits, no int-to-float instruction: the portable
#     form of the next, slower wherever both were timed (runs 10-15), so not a candidate (a driver
#     that refused the PTX would leave "bf16"); Triton's interpreter runs it, so
#     tests/test_fused_interpreted.py checks the fp16 path through it;
#   "f16_ptx" (int8): the same in PTX, four bytes per register (prmt + sub.f16x2).
# Triton's own int8 -> fp16, and fp8 -> fp16 (PTX converts two e4m3 to f16x2 at once), were slower
# than "bf16" at every decode shape on the H200 (run 10) and are not candidates. The tuner picks
# per shape; on the H200 (run 15): the few-rows kernel at one row for qkv, o and down, "f16_ptx"
# for gate/up and lm_head at one row and for most weights at 4-16 rows, "bf16" for qkv and o at 64.
# The fp16 conversions need x in fp16's range: a small kernel scales each row of x by a power of
# two first (``prescale_rows``, exact for bf16 values), once per product. Scaled inside each
# program instead, every program read all of x for it (at 64 rows 256 KB a program, 311 MB for
# lm_head's 1,187 tiles): that form lost to the prescaled one at every shape where both were
# timed, and was never picked once both were offered (run 15, 65 keys), so it is gone.
# On the H200 the "bf16" conversion's decode-sized products moved 0.5-2.2 TB/s of weights and took
# longer than cuBLAS on bf16 weights of twice the bytes (1.58 against 1.32 ms per token at one row;
# run 9, scripts/bench_decode_matmul.py): far from the bandwidth, which points at the conversion
# (not profiled). The fp16 conversions take fewer instructions per weight (f16_ptx: five per four)
# but need the extra launch that scales x. Which one wins is measured per shape, not assumed (``tune``).


@triton.jit
def _int8_to_f16_ptx(w):
    """uint8 bytes b of int8 weights v -> v in fp16: 0x6400 | (b ^ 0x80) is 1024 + v + 128."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, hi, bias;
        xor.b32 t, $2, 0x80808080;
        mov.b32 hi, 0x64646464;
        mov.b32 bias, 0x64806480;
        prmt.b32 $0, t, hi, 0x5140;
        prmt.b32 $1, t, hi, 0x5342;
        sub.f16x2 $0, $0, bias;
        sub.f16x2 $1, $1, bias;
        }""",
        constraints="=r,=r,r",
        args=[w],
        dtype=tl.float16,
        is_pure=True,
        pack=4,
    )


@triton.jit
def _load_rows(X, rm, kk, stride_xm, M, K):
    """Rows rm, columns kk of the product's input x (zeros outside it)."""
    return tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)


@triton.jit
def _program_tile(K, K_CHUNK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS_FIRST: tl.constexpr):
    """This program's rows (grid axis 1), output columns (axis 0), the K offsets of one step, and
    its range of K [k_lo, k_hi) (axis 2: the split of K; one split is all of K). ROWS_FIRST: rows
    on axis 0 and columns on axis 1, so the programs of one weight tile are launched side by side
    (``Launch.rows_first``)."""
    if ROWS_FIRST:
        row_tile, column_tile = tl.program_id(0), tl.program_id(1)
    else:
        row_tile, column_tile = tl.program_id(1), tl.program_id(0)
    rm = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = column_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = tl.program_id(2) * K_CHUNK
    return rm, rn, tl.arange(0, BLOCK_K), k_lo, tl.minimum(k_lo + K_CHUNK, K)


@triton.jit
def _store_rows(Out, out, rm, rn, stride_om, stride_os, M, N):
    """out [rows, columns] into Out, or into this split's partial product (stride_os apart)."""
    tl.store(Out + tl.program_id(2) * stride_os + rm[:, None] * stride_om + rn[None, :], out.to(Out.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _store_transposed(Out, out, rm, rn, stride_om, stride_os, M, N):
    """out [columns, rows] (the weight-major kernels' W x^T) into Out as ``_store_rows`` would."""
    tl.store(Out + tl.program_id(2) * stride_os + rm[None, :] * stride_om + rn[:, None], out.to(Out.dtype.element_ty), mask=(rm[None, :] < M) & (rn[:, None] < N))


@triton.jit
def _f16_weights(W, rn, kk, stride_wn, w_mask, CONVERT: tl.constexpr):
    """Rows rn, columns kk of int8 W (viewed as uint8) as exact fp16 values (zeros outside it)."""
    w = tl.load(W + rn[:, None] * stride_wn + kk[None, :], mask=w_mask, other=0)  # byte 0 is v = 0
    if CONVERT == "f16_bits":
        return ((w.to(tl.int16) ^ 0x80) | 0x6400).to(tl.float16, bitcast=True) - 1152.0
    return _int8_to_f16_ptx(w)


@triton.jit
def _tensor_core_kernel(
    X, W, Scale, XScale, Out,
    M, N, K, K_CHUNK,
    stride_xm, stride_wn, stride_om, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CONVERT: tl.constexpr, ROWS_FIRST: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """A tile of BLOCK_M rows (padding rows masked) on the tensor cores; W [N, K] 8-bit, K contiguous
    (int8 viewed as uint8 for "f16_bits" and "f16_ptx"), dequantized in registers. With those two,
    X is fp16, row r scaled by 1 / XScale[r] (``prescale_rows``)."""
    wait_for_previous(PDL)
    rm, rn, rk, k_lo, k_hi = _program_tile(K, K_CHUNK, BLOCK_M, BLOCK_N, BLOCK_K, ROWS_FIRST)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        x = _load_rows(X, rm, kk, stride_xm, M, K)
        w_mask = (rn[:, None] < N) & (kk[None, :] < K)
        if CONVERT == "bf16":
            w = tl.load(W + rn[:, None] * stride_wn + kk[None, :], mask=w_mask)  # no `other`: fp8 has no literal
            acc += tl.dot(x, tl.trans(tl.where(w_mask, w.to(x.dtype), 0.0)))
        else:
            acc += tl.dot(x, tl.trans(_f16_weights(W, rn, kk, stride_wn, w_mask, CONVERT)))
    scale = tl.load(Scale + rn, mask=rn < N, other=0.0)
    out = acc * scale[None, :]
    if CONVERT != "bf16":
        out = out * tl.load(XScale + rm, mask=rm < M, other=1.0)[:, None]
    _store_rows(Out, out, rm, rn, stride_om, stride_os, M, N)


@triton.jit
def _prescale_kernel(X, X16, XScale, K, stride_xm, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Row r of X -> X16[r] = X[r] / XScale[r] in fp16, XScale[r] the power of two that brings the
    row into [-1, 1] (exact, and fp16's 65,504 is never reached): one program per row, all of K in
    one block."""
    wait_for_previous(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    x = tl.load(X + row * stride_xm + cols, mask=cols < K, other=0.0).to(tl.float32)
    x_scale = tl.exp2(tl.ceil(tl.log2(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-30))))
    tl.store(XScale + row, x_scale)
    tl.store(X16 + row * K + cols, (x / x_scale).to(tl.float16), mask=cols < K)


def prescale_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x / s in fp16 [M, K], s [M] float32), s a power of two per row (exact)."""
    m, k = x.shape
    x16 = torch.empty((m, k), device=x.device, dtype=torch.float16)
    x_scale = torch.empty(m, device=x.device, dtype=torch.float32)
    _prescale_kernel[(m,)](x, x16, x_scale, k, x.stride(0), BLOCK_K=triton.next_power_of_2(k), **launch_args(x))
    return x16, x_scale


@triton.jit
def _weight_major_kernel(
    X, W, Scale, XScale, Out,
    M, N, K, K_CHUNK,
    stride_xm, stride_wn, stride_om, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CONVERT: tl.constexpr, ROWS_FIRST: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """out^T = W x^T on the tensor cores: the BLOCK_N weight rows take the MMA's wide side (Hopper's
    warpgroup MMA is 64 wide there), the few activation rows its narrow side (16-64). Computed as
    x W^T (``_tensor_core_kernel``), a decode batch of 2-16 rows fills a 16-row tile the MMA pads to
    64, and the converted weights are the MMA's shared-memory operand; here they can stay in
    registers. The usual shape of weight-only kernels for small batches. On the H200 it pays only
    split over K (its grids are 16-192 tiles): then the pick for qkv, gate/up and down at 4 rows
    and down at 64; unsplit it was the pick nowhere (run 13,
    scripts/bench_decode_matmul.py). CONVERT as in ``_tensor_core_kernel``."""
    wait_for_previous(PDL)
    rm, rn, rk, k_lo, k_hi = _program_tile(K, K_CHUNK, BLOCK_M, BLOCK_N, BLOCK_K, ROWS_FIRST)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        x = _load_rows(X, rm, kk, stride_xm, M, K)
        w_mask = (rn[:, None] < N) & (kk[None, :] < K)
        if CONVERT == "bf16":
            w = tl.load(W + rn[:, None] * stride_wn + kk[None, :], mask=w_mask)  # no `other`: fp8 has no literal
            acc += tl.dot(tl.where(w_mask, w.to(x.dtype), 0.0), tl.trans(x))
        else:  # x prescaled into fp16
            acc += tl.dot(_f16_weights(W, rn, kk, stride_wn, w_mask, CONVERT), tl.trans(x))
    scale = tl.load(Scale + rn, mask=rn < N, other=0.0)
    out = acc * scale[:, None]
    if CONVERT != "bf16":
        out = out * tl.load(XScale + rm, mask=rm < M, other=1.0)[None, :]
    _store_transposed(Out, out, rm, rn, stride_om, stride_os, M, N)


# The input as two int8 terms: each K-group of BLOCK_K entries of a row of x is q * s with q a
# 16-bit integer (|q| <= TERMS_Q, s = the group's largest |x| / TERMS_Q) written as q = 256 hi + lo,
# hi in [-127, 127] and lo in [-128, 127]. x W^T is then s (256 (hi W^T) + lo W^T) over each group:
# two int8 MMAs on W's own bytes, exact in int32, so W needs no conversion at all. The input loses
# only what 16 bits per group lose (half a step: |x| max / 65,024), far below the int8 weights'
# own rounding; a group of at most 256 keeps each MMA's int32 sum (<= 256 * 127 * 128 * 257) in range.
TERMS_Q = tl.constexpr(32512.0)
TERMS_MAX_GROUP = 256


@triton.jit
def _split_terms_kernel(X, Terms, XScale, K, stride_xm, stride_tt, GROUP: tl.constexpr, PDL: tl.constexpr):
    """Row r, K-group g of X -> Terms[0, r, g] (hi) and Terms[1, r, g] (lo), XScale[r, g] = s; one
    program per (row, group)."""
    wait_for_previous(PDL)
    row, group = tl.program_id(0), tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    x = tl.load(X + row * stride_xm + cols, mask=cols < K, other=0.0).to(tl.float32)
    s = tl.max(tl.abs(x), axis=0) / TERMS_Q
    q = tl.floor(x / tl.where(s > 0, s, 1.0) + 0.5)
    hi = tl.floor((q + 128.0) / 256.0)
    tl.store(XScale + row * tl.num_programs(1) + group, s)
    tl.store(Terms + row * K + cols, hi.to(tl.int8), mask=cols < K)
    tl.store(Terms + stride_tt + row * K + cols, (q - 256.0 * hi).to(tl.int8), mask=cols < K)


def split_terms(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 terms [2, M, K]: hi, lo; scales [M, cdiv(K, group)] float32)."""
    if group > TERMS_MAX_GROUP:
        raise ValueError(f"a group of {group} entries could overflow the int8 MMA's int32 sums (at most {TERMS_MAX_GROUP})")
    m, k = x.shape
    groups = triton.cdiv(k, group)
    terms = torch.empty((2, m, k), device=x.device, dtype=torch.int8)
    x_scale = torch.empty((m, groups), device=x.device, dtype=torch.float32)
    _split_terms_kernel[(m, groups)](x, terms, x_scale, k, x.stride(0), terms.stride(0), GROUP=group, **launch_args(x))
    return terms, x_scale


@triton.jit
def _two_term_kernel(
    Terms, W, Scale, XScale, Out,
    M, N, K, K_CHUNK,
    stride_tt, stride_wn, stride_om, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WEIGHT_MAJOR: tl.constexpr, ROWS_FIRST: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """x W^T from x's two int8 terms (``split_terms`` with group BLOCK_K) and int8 W [N, K] on the
    int8 tensor cores, W's tile as loaded. WEIGHT_MAJOR: computed as W x^T (``_weight_major_kernel``'s
    orientation: the weight rows on the MMA's wide side)."""
    wait_for_previous(PDL)
    rm, rn, rk, k_lo, k_hi = _program_tile(K, K_CHUNK, BLOCK_M, BLOCK_N, BLOCK_K, ROWS_FIRST)
    acc = tl.zeros([BLOCK_N, BLOCK_M] if WEIGHT_MAJOR else [BLOCK_M, BLOCK_N], tl.float32)
    groups = tl.cdiv(K, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        hi = _load_rows(Terms, rm, kk, K, M, K)
        lo = _load_rows(Terms + stride_tt, rm, kk, K, M, K)
        w = tl.load(W + rn[:, None] * stride_wn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0)
        s = tl.load(XScale + rm * groups + k0 // BLOCK_K, mask=rm < M, other=0.0)
        if WEIGHT_MAJOR:
            d = tl.dot(w, tl.trans(hi), out_dtype=tl.int32) * 256 + tl.dot(w, tl.trans(lo), out_dtype=tl.int32)
            acc += d.to(tl.float32) * s[None, :]
        else:
            d = tl.dot(hi, tl.trans(w), out_dtype=tl.int32) * 256 + tl.dot(lo, tl.trans(w), out_dtype=tl.int32)
            acc += d.to(tl.float32) * s[:, None]
    scale = tl.load(Scale + rn, mask=rn < N, other=0.0)
    if WEIGHT_MAJOR:
        _store_transposed(Out, acc * scale[:, None], rm, rn, stride_om, stride_os, M, N)
    else:
        _store_rows(Out, acc * scale[None, :], rm, rn, stride_om, stride_os, M, N)


@triton.jit
def _few_rows_kernel(
    X, W, Scale, Out,
    M, N, K, K_CHUNK,
    stride_xm, stride_wn, stride_om, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT8: tl.constexpr, ROWS_FIRST: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """At most BLOCK_M rows on the CUDA cores, no tensor-core tile: each weight element is converted
    once and multiplied into the BLOCK_M rows; the sums over K are reduced at the end. On the H200
    the fastest for the smaller weights at one row (o, down: 4.3 and 8.9 us against 7.2 and 16.9
    for the best tensor-core tile; run 10, scripts/bench_decode_matmul.py). INT8: W is viewed as
    uint8 (``_weight_tile``).
    """
    rm, rn, rk, k_lo, k_hi = _program_tile(K, K_CHUNK, BLOCK_M, BLOCK_N, BLOCK_K, ROWS_FIRST)
    # The first step's weights and the scales do not come from an earlier kernel: with programmatic
    # launch their loads are in flight while the previous kernel (the input's) finishes.
    w = _weight_tile(W, rn, k_lo + rk, stride_wn, N, K, INT8)
    scale = tl.load(Scale + rn, mask=rn < N, other=0.0)
    wait_for_previous(PDL)
    acc = _load_rows(X, rm, k_lo + rk, stride_xm, M, K).to(tl.float32)[:, None, :] * w[None, :, :]
    for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        kk = k0 + rk
        x = _load_rows(X, rm, kk, stride_xm, M, K)
        acc += x.to(tl.float32)[:, None, :] * _weight_tile(W, rn, kk, stride_wn, N, K, INT8)[None, :, :]
    out = tl.sum(acc, axis=2) * scale[None, :]
    _store_rows(Out, out, rm, rn, stride_om, stride_os, M, N)


@triton.jit
def _weight_tile(W, rn, kk, stride_wn, N, K, INT8: tl.constexpr):
    """Rows rn, columns kk of an 8-bit W as float32 (zeros outside it). INT8: W is the int8 weight
    viewed as uint8, converted without an int-to-float instruction: the byte b = v mod 256 of v,
    xored with 0x80, is v + 128 in [0, 256); put in the low mantissa bits of 2^23 it reads as
    2^23 + v + 128, exactly."""
    w_mask = (rn[:, None] < N) & (kk[None, :] < K)
    if INT8:
        w = tl.load(W + rn[:, None] * stride_wn + kk[None, :], mask=w_mask, other=0)  # byte 0 is v = 0
        wf = ((w.to(tl.int32) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    else:  # float8_e4m3fn: no literal for `other`, so the masked lanes are zeroed after the load
        w = tl.load(W + rn[:, None] * stride_wn + kk[None, :], mask=w_mask)
        wf = tl.where(w_mask, w.to(tl.float32), 0.0)
    return wf


@triton.jit
def _sum_splits_kernel(Partial, Out, M, N, stride_om, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Out = the sum of SPLIT_K float32 partial products [SPLIT_K, M, N], added in split order (the
    same answer at every run, unlike atomic adds)."""
    wait_for_previous(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros([BLOCK], tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(Partial + split * M * N + offs, mask=mask, other=0.0)
    tl.store(Out + (offs // N) * stride_om + offs % N, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(W, Scale, Out, K, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < K
    w = tl.load(W + row * K + cols, mask=mask)
    out = w.to(tl.float32) * tl.load(Scale + row)
    tl.store(Out + row * K + cols, out.to(Out.dtype.element_ty), mask=mask)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [N, K] (8-bit, contiguous) * scale [N] -> [N, K] in ``dtype``, one rounding.

    One pass, each weight read and written once: PyTorch's own int8 * bf16 with a broadcast scale
    (its generic mixed-type kernel) took 7.5 ms per one-prompt prefill on the H100 for the text
    and vision weights (scripts/profile_prefill.py, run 7). This kernel: 1.5 ms per one-prompt
    int8 prefill, 2.1 ms per sixteen-prompt one, of 6.9 and 53 ms of kernels (H200, the same
    script, run 12)."""
    n, k = weight.shape
    out = torch.empty((n, k), device=weight.device, dtype=dtype)
    block_k = min(triton.next_power_of_2(k), 4096)
    _dequantize_kernel[(n, triton.cdiv(k, block_k))](weight, scale, out, k, BLOCK_K=block_k)
    return out


@dataclass(frozen=True)
class Launch:
    """One way to compute an 8-bit product: a kernel, its tile, and how many programs share each
    tile's K (``split_k``: float32 partial products, then ``_sum_splits_kernel``)."""

    # "tensor_cores", "weight_major", "few_rows", "w8a8" (fp8 weights: cuBLASLt on fp8 activations),
    # "dequantize" (prefill sizes: W in x's dtype for the call, then cuBLAS)
    kernel: str
    block_m: int = 16
    block_n: int = 32
    block_k: int = 256
    warps: int = 4
    stages: int = 4
    # The tensor-core kernels' CONVERT; "f16_*": x prescaled into fp16 first; "int8x2" (int8 W):
    # x split into two int8 terms, W's bytes into the int8 MMA as they are (``_two_term_kernel``).
    convert: str = "bf16"
    split_k: int = 1
    # The row tiles of one weight tile launched side by side (grid axis 0), so that its weights are
    # read from memory once and from L2 by the others: for a batch of more rows than block_m.
    rows_first: bool = False

    @property
    def family(self) -> str:
        """The kernel and how it runs, without the tile: "tc/bf16", "weight_major/int8x2/split-k", ..."""
        name = self.kernel if self.kernel in ("few_rows", "dequantize") else f"{'tc' if self.kernel == 'tensor_cores' else self.kernel}/{self.convert}"
        return name + ("/rows-first" if self.rows_first else "") + ("/split-k" if self.split_k > 1 else "")

    @property
    def label(self) -> str:
        if self.kernel in ("dequantize", "w8a8"):  # cuBLAS's tiles, not ours
            return self.family
        rows = "" if self.kernel == "few_rows" else f"{self.block_m}:"  # few_rows: one tile holds the rows
        return f"{self.family} {rows}{self.block_n}x{self.block_k} w{self.warps} s{self.stages} k/{self.split_k}"

    @property
    def max_error(self) -> float:
        """Relative error allowed against the float32 product at tuning: bf16 outputs are ~1e-3
        off; W8A8 rounds the activations to fp8 too (2.6e-2 measured on random rows, run 10), within
        tests/test_gpu.py's fp8 bound."""
        return 6e-2 if self.kernel == "w8a8" else 2e-2

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
        m, (n, k) = x.shape[0], weight.shape
        if self.kernel == "w8a8":
            from .fp8_matmul import w8a8_matmul

            out.copy_(w8a8_matmul(x, weight, scale))
            return
        if self.kernel == "dequantize":
            torch.mm(x, dequantize(weight, scale, x.dtype).T, out=out)
            return
        k_chunk = triton.cdiv(triton.cdiv(k, self.split_k), self.block_k) * self.block_k  # whole BLOCK_K steps; a last split past K computes zeros
        target = out if self.split_k == 1 else torch.empty((self.split_k, m, n), device=x.device, dtype=torch.float32)
        tiles = (triton.cdiv(m, self.block_m), triton.cdiv(n, self.block_n))
        grid = (*(tiles if self.rows_first else tiles[::-1]), self.split_k)
        meta = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "ROWS_FIRST": self.rows_first, **launch_args(x)}
        if self.convert == "int8x2":
            terms, x_scale = split_terms(x, self.block_k)
            _two_term_kernel[grid](terms, weight, scale, x_scale, target, m, n, k, k_chunk, terms.stride(0), weight.stride(0), target.stride(-2),
                                   target.stride(0) if self.split_k > 1 else 0, WEIGHT_MAJOR=self.kernel == "weight_major", **meta,
                                   num_warps=self.warps, num_stages=self.stages)  # fmt: skip
        else:
            self._launch(x, weight, scale, target, k_chunk, grid, meta)
        if self.split_k > 1:
            block = 1024
            _sum_splits_kernel[(triton.cdiv(m * n, block),)](target, out, m, n, out.stride(0), SPLIT_K=self.split_k, BLOCK=block, **launch_args(x))

    def _launch(self, x, weight, scale, target, k_chunk, grid, meta) -> None:
        """The bf16- and fp16-operand kernels and the few-rows one, into ``target`` (``out`` or the
        splits' partial products)."""
        m, (n, k) = x.shape[0], weight.shape
        int8 = weight.dtype == torch.int8
        if int8 and (self.kernel == "few_rows" or self.convert.startswith("f16_")):
            weight = weight.view(torch.uint8)
        operands = (x, weight, scale)
        if self.kernel == "few_rows":
            kernel, meta["INT8"] = _few_rows_kernel, int8
        else:
            kernel = _weight_major_kernel if self.kernel == "weight_major" else _tensor_core_kernel
            meta["CONVERT"] = self.convert
            fp16 = self.convert != "bf16"
            x16, x_scale = prescale_rows(x) if fp16 else (x, scale)  # scale: an unread placeholder
            operands = (x16, weight, scale, x_scale)
        kernel[grid](*operands, target, m, n, k, k_chunk, operands[0].stride(0), weight.stride(0), target.stride(-2),
                     target.stride(0) if self.split_k > 1 else 0, **meta, num_warps=self.warps, num_stages=self.stages)  # fmt: skip


def rows_bucket(m: int) -> int:
    return 1 << (m - 1).bit_length()  # 1, 2, 4, ..., 64, 128, ...


def split_to_fill(programs: int, k: int, block_k: int, sms: int) -> int:
    """How many ways to split K so a grid of ``programs`` tiles has two programs per SM, each split
    keeping at least two BLOCK_K steps. N = 2,048 weights (o, down) give 16-64 tiles of 32-128
    weight rows: a quarter to a half of an H200's 132 SMs, each streaming all of K alone."""
    split = 1
    while programs * split < 2 * sms and k >= 4 * split * block_k:
        split *= 2
    return split


def with_splits(launches: list[Launch], bucket: int, n: int, k: int, sms: int) -> list[Launch]:
    """``launches``, then each split over K where its grid leaves SMs idle (``split_to_fill``);
    none added without a shape or an SM count."""
    out = list(launches)
    if n and sms:
        for launch in launches:
            split = split_to_fill(triton.cdiv(n, launch.block_n) * triton.cdiv(bucket, launch.block_m), k, launch.block_k, sms)
            if split > 1:
                out.append(replace(launch, split_k=split))
    return out


def candidates(bucket: int, weight_dtype: torch.dtype, n: int = 0, k: int = 0, sms: int = 0) -> list[Launch]:
    """What the tuner measures for a product of ``bucket`` rows at most of an [n, k] weight on a GPU
    of ``sms`` SMs; the first is the default where nothing can be measured (the CPU, Triton's
    interpreter, inside a graph capture). The tiles are the fastest of a wider sweep on the H200
    (run 9, scripts/bench_decode_matmul.py); the weight-major kernel's four (from 2 rows) are a first
    guess, not swept. Each tile of the bf16 conversion whose grid leaves SMs idle is also measured
    split over K (``split_to_fill``; none without a shape or SM count), and so is each of "f16_ptx",
    in both tensor-core kernels (run 15: the pick for most weights at 4 and 16 rows). Above
    DECODE_MAX_ROWS: ``prefill_candidates``."""
    if bucket > DECODE_MAX_ROWS:
        return prefill_candidates(weight_dtype, n * k)
    block_m = max(16, bucket)  # the tensor cores' smallest tile; padding rows are masked
    tiles = [(32, 256, 4, 4), (16, 256, 4, 4), (16, 512, 4, 3), (64, 128, 4, 4), (128, 64, 4, 4)]
    out = [Launch("tensor_cores", block_m, n_, k_, w, s) for n_, k_, w, s in tiles]
    if weight_dtype == torch.int8:
        # From 16 rows, three tiles of two warpgroups too (converting the weights is the warps'
        # work): a first guess, not swept; 128x128 with 8 warps was the pick for lm_head at 16
        # rows and gate/up at 32 in one start of run 15, not in another (scripts/bench_gpu.py's
        # and profile_decode.py's tuning logs, call Q), so the tiles sit within noise of each other.
        wide = [(128, 64, 8, 4), (128, 128, 8, 3), (64, 128, 8, 4)] if bucket >= 16 else []
        out += [Launch("tensor_cores", block_m, n_, k_, w, s, "f16_ptx") for n_, k_, w, s in tiles + wide]
    if bucket >= 2:
        major = [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4)]
        out += [Launch("weight_major", block_m, n_, k_, w, s) for n_, k_, w, s in major]
        if weight_dtype == torch.int8:
            out += [Launch("weight_major", block_m, n_, k_, w, s, "f16_ptx") for n_, k_, w, s in major]
    if weight_dtype == torch.int8 and bucket >= 32:
        # At 64 rows the int8 products took 1.72 ms a token against 1.08 at 16 (H200, run 15), one
        # 64-row tile converting each weight tile once. Tiles of 16-32 rows instead, the rows'
        # tiles of a weight tile side by side (its weights from L2 after the first), spend more
        # conversions on fewer bytes of x per program. In run 19 (H200) the pick for down at 64
        # rows and gate/up and lm_head at 32, 1-2% ahead of the best other launch there
        # (bench_decode_matmul.py), and in the engine's tuning log for qkv and two vision weights
        # at 32 (margins not logged). Tiles of 256 weight rows, measured there too, were picked
        # nowhere.
        row_tiled = [("tensor_cores", 16, 32, 256, 4, 4), ("tensor_cores", 16, 64, 128, 4, 4), ("tensor_cores", 16, 16, 512, 4, 3),
                     ("tensor_cores", 32, 32, 256, 4, 4), ("tensor_cores", 32, 64, 128, 4, 4), ("weight_major", 16, 64, 128, 4, 4),
                     ("weight_major", 16, 128, 128, 8, 3), ("weight_major", 32, 64, 128, 4, 4), ("weight_major", 32, 128, 128, 8, 3)]  # fmt: skip
        out += [Launch(kernel, m_, n_, k_, w, s, "f16_ptx", rows_first=True) for kernel, m_, n_, k_, w, s in row_tiled]
        # The fastest for down at 64 rows in run 19's sweep (14.6 us split in eight, against the
        # tuner's 16.4; bench_decode_matmul.py --sweep); nothing else there beat the picks by 3%.
        out.append(Launch("tensor_cores", block_m, 128, 256, 8, 3, "f16_ptx"))
    if weight_dtype == torch.int8:
        # x as two int8 terms, W's bytes straight into the int8 MMA: no conversion of the weights,
        # which run 19's sweep left as the suspect for the 64-row gap to cuBLAS. BLOCK_K is also
        # the terms' group (at most TERMS_MAX_GROUP). A first guess, and the int8x2 sweep's best
        # for down at 64 rows (128x256, 4 warps: 12.6 us against 13.5; H200, run 20,
        # bench_decode_matmul.py --sweep --sweep-convert int8x2), the other shapes' best there
        # being candidates already. The pick for most weights from 4 rows, and at one row for down
        # and lm_head.
        terms = [(64, 128, 4, 4), (128, 128, 4, 4), (128, 256, 8, 3), (256, 128, 8, 3), (32, 256, 4, 4), (64, 256, 4, 3), (64, 128, 8, 4), (32, 128, 4, 4), (128, 256, 4, 3)]
        out += [Launch("tensor_cores", block_m, n_, k_, w, s, "int8x2") for n_, k_, w, s in terms]
        out += [Launch("weight_major", block_m, n_, k_, w, s, "int8x2") for n_, k_, w, s in terms[:4]]
    if bucket <= 4:
        # Also measured and never picked (H200, run 14, bench_decode_matmul.py at 1-4 rows): all of
        # K in one step (2x2048, 4x2048 with 8 warps) and smaller tiles (8x256, 16x128).
        few = [(4, 512, 4, 3), (4, 1024, 4, 1), (8, 512, 4, 3), (32, 128, 4, 3)]
        out += [Launch("few_rows", bucket, n_, k_, w, s) for n_, k_, w, s in few]
    out = with_splits(out, bucket, n, k, sms)
    if weight_dtype == torch.float8_e4m3fn and bucket >= 16:
        out.append(Launch("w8a8"))
    return out


def prefill_candidates(weight_dtype: torch.dtype, elements: int = 0) -> list[Launch]:
    """For more than DECODE_MAX_ROWS rows of a weight of ``elements`` entries (0: unknown):
    "dequantize" first (the default, and what every such product ran before), then for int8 W the
    int8x2 kernel in PREFILL_TERMS_TILES; a weight too large to dequantize (DEQUANTIZE_MAX_ELEMENTS)
    gets only those."""
    out = [Launch("dequantize")] if weight_dtype != torch.int8 or elements <= DEQUANTIZE_MAX_ELEMENTS else []
    if weight_dtype == torch.int8:
        out += [Launch("tensor_cores", m_, n_, k_, w, s, "int8x2") for m_, n_, k_, w, s in PREFILL_TERMS_TILES]
    return out


@contextmanager
def tuning_prefills():
    """Within it, a prefill-sized product (above DECODE_MAX_ROWS rows) with no pick yet is tuned on
    first use, as decode-sized ones always are; outside it, such a product takes the pick already
    made for its key, or "dequantize". Not thread-safe: for start-up, before the engine runs."""
    global _tune_prefills
    _tune_prefills, before = True, _tune_prefills
    try:
        yield
    finally:
        _tune_prefills = before


@dataclass(frozen=True)
class Tuning:
    """The measured candidates of one (rows bucket, N, K, weight dtype): (launch, ms or None, why not)."""

    best: Launch
    timings: list[tuple[Launch, float | None, str]]


TUNED: dict[tuple, Tuning] = {}  # filled on first use of each key; scripts/bench_decode_matmul.py prints it
CHECK_ROWS = 4096  # output columns compared with a reference when a candidate is measured


def _measurable(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_current_stream_capturing()


def _probe(bucket: int, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """Random rows for a key (seeded by its bucket), an output buffer, and a check of a launch's
    output against the float32 product (on the first CHECK_ROWS output columns)."""
    n, k = weight.shape
    generator = torch.Generator(device=weight.device).manual_seed(bucket)
    x = torch.randn(bucket, k, device=weight.device, dtype=dtype, generator=generator)
    cols = min(n, CHECK_ROWS)
    reference = x.float() @ (weight[:cols].float() * scale[:cols, None].float()).T
    out = torch.empty(bucket, n, device=weight.device, dtype=dtype)

    def check(launch: Launch) -> None:
        out.fill_(float("nan"))
        launch(x, weight, scale, out)
        error = float((out[:, :cols].float() - reference).norm() / reference.norm())
        if not error < launch.max_error:  # NaN too: an unwritten output
            raise ValueError(f"relative error {error:.2e}")

    return x, out, check


def tune(bucket: int, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Tuning:
    """Time every candidate for this weight's shape (CUDA-graph replays over copies of the weight
    that do not fit in L2: ``graph_timing``) on random rows; keep the fastest whose output agrees
    with a float32 reference. A candidate that fails to compile or disagrees is skipped, said why."""
    from .graph_timing import graph_ms, rotating

    n, k = weight.shape
    x, out, check = _probe(bucket, weight, scale, dtype)
    copies = rotating(weight)
    timings: list[tuple[Launch, float | None, str]] = []
    sms = torch.cuda.get_device_properties(weight.device).multi_processor_count
    for launch in candidates(bucket, weight.dtype, n, k, sms):
        try:
            check(launch)
            timings.append((launch, graph_ms([lambda w=w: launch(x, w, scale, out) for w in copies]), ""))
        except Exception as problem:  # noqa: BLE001 - a tile over the registers, PTX the driver refuses, ...
            timings.append((launch, None, (str(problem).splitlines() or [type(problem).__name__])[0][:160]))
    del copies
    # The copies (up to graph_timing.L2_FLUSH_BYTES) would otherwise stay reserved by PyTorch's
    # allocator, counted in the server's GPU memory (the three-tier server's bound is 6 GB).
    torch.cuda.empty_cache()
    timed = [(launch, ms) for launch, ms, _ in timings if ms is not None]
    if not timed:
        raise RuntimeError(f"no 8-bit matmul kernel ran for a {n} x {k} weight: {timings}")
    return Tuning(best=pick(timed), timings=timings)


def cached_or_tuned(key: tuple, weight: torch.Tensor, scale: torch.Tensor) -> Tuning:
    """The pick kept from an earlier start (``tuning_cache``), checked again, else ``tune``'s (kept
    for the next start)."""
    from . import tuning_cache

    bucket, dtype = key[0], key[4]
    print_ = tuning_cache.fingerprint(weight.device)
    fields = tuning_cache.lookup(print_, key)
    if fields is not None:
        try:
            launch = Launch(**fields)
            _probe(bucket, weight, scale, dtype)[2](launch)
            return Tuning(best=launch, timings=[(launch, None, "from the tuning cache")])
        except Exception as problem:  # noqa: BLE001 - an entry of other fields, a launch that no longer agrees
            print(f"qwen3vl: cached decode launch for {key} not used ({problem}); tuning anew", file=sys.stderr)
    started = time.perf_counter()
    tuning = tune(bucket, weight, scale, dtype)
    tuning_cache.store(print_, key, tuning.best)
    # A first start on a GPU tunes every key (105.6 s for the int8 engine on a fresh H200, with
    # Triton compiling each candidate: run 14): one line each, so the wait shows where it goes.
    best_ms = next(ms for launch, ms, _ in tuning.timings if launch == tuning.best)
    print(f"qwen3vl: tuned the {weight.shape[0]} x {weight.shape[1]} {str(weight.dtype).replace('torch.', '')} product for up to "
          f"{bucket} rows: {tuning.best.label}, {best_ms * 1e3:.1f} us ({len(tuning.timings)} launches in "
          f"{time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip
    return tuning


# A split launch (two kernels) must beat the best whole-K one by this much. Run 13 (H200, the same
# code in two processes): where the one-row tuning picked two split products a layer that tie the
# whole ones in isolation (down: 9.5 against 9.5 us), the step's graph replay took 1.549 ms; with
# whole ones, 1.349 (scripts/profile_decode.py). The splits this keeps at 4 rows won by 8-27%, at
# 64 rows gate/up's by 5% (scripts/bench_decode_matmul.py).
MIN_SPLIT_GAIN = 0.05


def pick(timed: list[tuple[Launch, float]]) -> Launch:
    """The fastest launch, a split one only where it beats every whole-K launch by MIN_SPLIT_GAIN."""
    best = min(timed, key=lambda t: t[1])
    whole = [t for t in timed if t[0].split_k == 1]
    if best[0].split_k == 1 or not whole:
        return best[0]
    best_whole = min(whole, key=lambda t: t[1])
    return best[0] if best[1] < (1 - MIN_SPLIT_GAIN) * best_whole[1] else best_whole[0]


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] (bf16/fp16) @ 8-bit weight [N, K]^T, times scale [N] (+ bias [N]) -> [..., N] in
    x's dtype.

    The fastest launch measured on this GPU for the weight's shape and the rows' bucket (``tune``,
    once per key: the runner's warm-up and graph captures run every decode bucket, and within
    ``tuning_prefills`` its prefill buckets, eagerly first). "dequantize" adds the bias in cuBLAS's
    epilogue (added apart, it was 208 kernels and 7.5 of the 31.8 ms of sixteen images' int8
    vision tower on the H200: scripts/profile_prefill.py, run 12)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m, n = x2.shape[0], weight.shape[0]
    launch = launch_for(x2, weight, scale)
    if launch.kernel == "dequantize":
        dense = dequantize(weight, scale, x.dtype).T
        out = x2 @ dense if bias is None else torch.addmm(bias.to(x.dtype), x2, dense)
        return out.reshape(*shape[:-1], n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    launch(x2, weight, scale, out)
    if bias is not None:
        out += bias.to(x.dtype)
    return out.reshape(*shape[:-1], n)


def launch_for(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> Launch:
    """The launch for rows x [M, K] of this weight: tuned (or taken from the tuning cache) on first
    use of its key (a prefill-sized key only inside ``tuning_prefills``)."""
    bucket, (n, k) = rows_bucket(x.shape[0]), weight.shape
    key = (bucket, n, k, weight.dtype, x.dtype)
    tuning = TUNED.get(key)
    if tuning is None and _measurable(x) and (bucket <= DECODE_MAX_ROWS or _tune_prefills):
        tuning = TUNED[key] = cached_or_tuned(key, weight, scale)
    return tuning.best if tuning is not None else _untuned_launch(bucket, weight.dtype, n, k)


@cache
def _untuned_launch(bucket: int, weight_dtype: torch.dtype, n: int, k: int) -> Launch:
    # Built once per key: a prefill size left untuned (the vision tower's) asks on every call.
    return candidates(bucket, weight_dtype, n, k)[0]
