"""Decode attention over the slot KV cache, one Triton program per (sequence, KV head, key split).

Each program reads only its sequence's valid keys (no padding to the longest sequence in the
batch), handles the query heads that share the KV head together (GQA), and keeps an online
softmax. Lengths live in a device tensor, so the kernel can be captured in a CUDA graph.

A small batch has few (sequence, KV head) pairs: 8 programs at one sequence on a GPU of 132 SMs,
each walking its keys alone (7.2 us a layer for a 300-token context, as long as at four
sequences: scripts/profile_decode.py, run 12). There the keys are split into up to
``MAX_SPLITS`` ranges, each program keeping its own running maximum and sum, and a second kernel
merges them (flash-decoding): 3.6 + 1.8 us a layer at one sequence (run 13, the same script and
context). From 32 sequences the pairs fill the GPU and nothing is split.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kv_cache import LayerCache
from .online_softmax import attend_block
from .pdl import launch_args, wait_for_previous

BLOCK_L = 64  # keys per inner step
MAX_SPLITS = 16


@triton.jit
def _decode_attention_kernel(
    Q, K, V, KScale, VScale, Out, PartMax, PartSum, Slots, Lengths,
    sm_scale,
    stride_qb, stride_qh,
    stride_ks, stride_kh, stride_kl, stride_ss, stride_sh,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr,
    SPLITS: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """SPLITS == 1: Out [B, H, D] is the attention. Otherwise Out [B, H, SPLITS, D] (float32) gets
    each split's unnormalised sum of values, PartMax / PartSum [B, H, SPLITS] its maximum score
    and sum of exponentials (-inf and 0 for a split past the sequence's keys)."""
    wait_for_previous(PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(Slots + b).to(tl.int64)
    length = tl.load(Lengths + b)
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_L) * BLOCK_L  # whole BLOCK_L steps per split
    g = tl.arange(0, BLOCK_G)  # query heads of this KV head, padded to a dot-friendly 16
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < GROUP, other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    base = slot * stride_ks + kv_head * stride_kh
    scale_base = slot * stride_ss + kv_head * stride_sh
    for start in range(split * chunk, tl.minimum(split * chunk + chunk, length), BLOCK_L):
        offs = start + tl.arange(0, BLOCK_L)
        valid = offs < length
        kv_offsets = base + offs[:, None] * stride_kl + d[None, :]
        m, l, acc = attend_block(q, K, V, kv_offsets, valid[:, None], valid[None, :], m, l, acc, sm_scale, IEEE,
                                 KScale, VScale, scale_base + offs[None, :], valid[None, :], QUANT)  # fmt: skip
    real = g < GROUP
    if SPLITS == 1:
        out = acc / l[:, None]
        tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty), mask=real[:, None])
    else:
        row = (b * GROUP * tl.num_programs(1) + heads) * SPLITS + split  # [B, H, SPLITS] flattened
        tl.store(PartMax + row, m, mask=real)
        tl.store(PartSum + row, l, mask=real)
        tl.store(Out + row[:, None] * HEAD_DIM + d[None, :], acc, mask=real[:, None])


@triton.jit
def _merge_splits_kernel(Acc, PartMax, PartSum, Out, stride_ob, stride_oh, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         SPLITS: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """One (sequence, head): the splits' sums rescaled to their common maximum, in split order."""
    wait_for_previous(PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    row = (b * HEADS + head) * SPLITS + s
    m = tl.load(PartMax + row)
    weight = tl.exp(m - tl.max(m, 0))  # a split past the keys: exp(-inf) = 0
    total = tl.sum(tl.load(PartSum + row) * weight, 0)
    acc = tl.sum(tl.load(Acc + row[:, None] * HEAD_DIM + d[None, :]) * weight[:, None], 0)
    tl.store(Out + b * stride_ob + head * stride_oh + d, (acc / total).to(Out.dtype.element_ty))


def splits_for(batch: int, kv_heads: int, sms: int) -> int:
    """Key ranges per (sequence, KV head): the fewest (a power of two) that give two programs per SM."""
    splits = 1
    while batch * kv_heads * splits < 2 * sms and splits < MAX_SPLITS:
        splits *= 2
    return splits


def decode_attention(q, cache: LayerCache, slots, lengths, splits: int | None = None) -> torch.Tensor:
    """Same contract as ``text_model.sdpa_decode_attention``: q [B, H, D] -> [B, H, D].

    cache: one layer's, its K and V [slots, Hkv, max_len, D] contiguous (int8 with scales, or q's
    dtype); lengths: [B] valid keys (>= 1); splits: key ranges per (sequence, KV head), by
    default ``splits_for`` this GPU (1 elsewhere).
    """
    batch, heads, head_dim = q.shape
    k_cache, v_cache = cache.k, cache.v
    k_scale, v_scale = cache.kernel_scales()
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    q = q.contiguous()
    if splits is None:
        splits = splits_for(batch, kv_heads, torch.cuda.get_device_properties(q.device).multi_processor_count) if q.is_cuda else 1
    if splits == 1:
        target, part_max, part_sum = out, out, out  # the last two unused
    else:
        target = torch.empty((batch, heads, splits, head_dim), device=q.device, dtype=torch.float32)
        part_max, part_sum = (torch.empty((batch, heads, splits), device=q.device, dtype=torch.float32) for _ in range(2))
    _decode_attention_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, k_scale, v_scale, target, part_max, part_sum, slots, lengths,
        head_dim**-0.5,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_scale.stride(0), k_scale.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_L=BLOCK_L,
        SPLITS=splits, IEEE=q.dtype == torch.float32, QUANT=cache.quantized, **launch_args(q),
    )  # fmt: skip
    if splits > 1:
        _merge_splits_kernel[(batch, heads)](target, part_max, part_sum, out, out.stride(0), out.stride(1), HEADS=heads, HEAD_DIM=head_dim,
                                             SPLITS=splits, **launch_args(q))  # fmt: skip
    return out
