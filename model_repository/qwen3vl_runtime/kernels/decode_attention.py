"""Decode attention over the slot KV cache, one Triton program per (sequence, KV head).

Each program reads only its sequence's valid keys (no padding to the longest sequence in the
batch), handles the query heads that share the KV head together (GQA), and keeps an online
softmax. Lengths live in a device tensor, so the kernel can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_L = 64  # keys per inner step


@triton.jit
def _decode_attention_kernel(
    Q, K, V, Out, Slots, Lengths,
    sm_scale,
    stride_qb, stride_qh,
    stride_ks, stride_kh, stride_kl,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    slot = tl.load(Slots + b).to(tl.int64)
    length = tl.load(Lengths + b)
    g = tl.arange(0, BLOCK_G)  # query heads of this KV head, padded to a dot-friendly 16
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < GROUP, other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    base = slot * stride_ks + kv_head * stride_kh
    for start in range(0, length, BLOCK_L):
        offs = start + tl.arange(0, BLOCK_L)
        valid = offs < length
        kv_offsets = base + offs[:, None] * stride_kl + d[None, :]
        k = tl.load(K + kv_offsets, mask=valid[:, None], other=0.0)  # [BLOCK_L, D]
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * sm_scale, float("-inf"))  # [BLOCK_G, BLOCK_L]
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_offsets, mask=valid[:, None], other=0.0)  # [BLOCK_L, D]
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    out = acc / l[:, None]
    tl.store(
        Out + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
        out.to(Out.dtype.element_ty),
        mask=g[:, None] < GROUP,
    )


def decode_attention(q, k_cache, v_cache, slots, lengths) -> torch.Tensor:
    """Same contract as ``text_model.sdpa_decode_attention``: q [B, H, D] -> [B, H, D].

    k_cache, v_cache: [slots, Hkv, max_len, D] (contiguous); lengths: [B] valid keys (>= 1).
    """
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    q = q.contiguous()
    _decode_attention_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, out, slots, lengths,
        head_dim**-0.5,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_L=BLOCK_L,
        IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    return out
