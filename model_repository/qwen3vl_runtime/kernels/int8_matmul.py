"""Weight-only 8-bit matmul: y = x @ dequant(W)^T with the dequantization fused into the kernel.

W stays 8-bit in memory (int8 or float8_e4m3fn, [out, in], one float32 scale per output row): a
decode step reads half the bytes of bf16 weights, which is what makes it faster (small-batch
steps are bound by weight reads). The scale multiplies the fp32 accumulator once per output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _configs():
    """Few rows (a decode step): thin tiles over many weight rows, long K steps; bound by reading W."""
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for n, k, w, s in (
            (16, 256, 4, 4),
            (16, 512, 4, 3),
            (32, 256, 4, 4),
            (32, 512, 8, 3),
            (64, 128, 4, 4),
            (64, 256, 8, 3),
            (128, 128, 8, 3),
            (128, 64, 4, 4),
        )
    ]


# Above this many rows (a prefill, an image's patches) the product is bound by the tensor cores,
# not by reading W. On the H100 this kernel, even given 128-256-row tiles, took about twice bf16's
# time at 784-4,096 rows (scripts/bench_matmul.py, run 5), and dequantizing for the call then
# cuBLAS cut the engine's prefill at 64 streams from 16.7 to 9.1 ms per step (bench_engine.py,
# run 6; docs/benchmarks.md). Decode batches are at most this size and keep the fused kernel.
DECODE_MAX_ROWS = 64
# ... except for weights too large to copy per call (the tied lm_head: 622 MB in bf16), which
# only ever see a few rows (each prompt's last).
DEQUANTIZE_MAX_ELEMENTS = 64 << 20


@triton.jit
def _int8_matmul_kernel(
    X, W, Scale, Out,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        # w: [BLOCK_N, BLOCK_K], K contiguous (16-byte loads along rows), dequantized in registers
        w_mask = (rn[:, None] < N) & (kk[None, :] < K)
        w = tl.load(W + rn[:, None] * stride_wn + kk[None, :], mask=w_mask)  # no `other`: fp8 has no literal
        acc += tl.dot(x, tl.trans(tl.where(w_mask, w.to(x.dtype), 0.0)))
    scale = tl.load(Scale + rn, mask=rn < N, other=0.0)
    out = acc * scale[None, :]
    tl.store(Out + rm[:, None] * stride_om + rn[None, :], out.to(Out.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


# Tuned once per (batch bucket, N, K) on first use; the runner's warm-up does that before graph capture.
_tuned_kernel = triton.autotune(configs=_configs(), key=["BLOCK_M", "N", "K"])(_int8_matmul_kernel)


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
    and vision weights (scripts/profile_prefill.py, run 7). This kernel's own time was not
    profiled apart; the engine's int8 prefill at 64 streams went from 4.2 to 4.1 ms per step."""
    n, k = weight.shape
    out = torch.empty((n, k), device=weight.device, dtype=dtype)
    block_k = min(triton.next_power_of_2(k), 4096)
    _dequantize_kernel[(n, triton.cdiv(k, block_k))](weight, scale, out, k, BLOCK_K=block_k)
    return out


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [..., K] (bf16/fp16) @ 8-bit weight [N, K]^T, times scale [N] -> [..., N] in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m, k = x2.shape
    n = weight.shape[0]
    if m > DECODE_MAX_ROWS and weight.numel() <= DEQUANTIZE_MAX_ELEMENTS:
        return (x2 @ dequantize(weight, scale, x.dtype).T).reshape(*shape[:-1], n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))  # noqa: E731
    _tuned_kernel[grid](x2, weight, scale, out, m, n, k, x2.stride(0), weight.stride(0), out.stride(0), BLOCK_M=block_m)
    return out.reshape(*shape[:-1], n)
