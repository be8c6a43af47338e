"""One block of keys folded into a running attention (flash-attention's online softmax), shared by
the decode and prompt attention kernels.

A program holds its queries' running maximum score ``m``, sum of exponentials ``l`` and
unnormalised sum of values ``acc``; each block of keys rescales them to the new maximum and adds
its own share, so the keys are read once and the scores never leave the SM. The caller divides
``acc`` by ``l`` at the end (or merges splits that kept their own ``m`` and ``l``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_block(q, K, V, kv_offsets, loaded, visible, m, l, acc, sm_scale, IEEE: tl.constexpr,
                 KScale, VScale, scale_offsets, scale_loaded, QUANT: tl.constexpr):  # fmt: skip
    """q [Q, D]; kv_offsets [N, D] a block of keys (and values) of one slot and head, ``loaded`` [N, 1]
    which of them exist, ``visible`` [Q, N] which each query sees (at least one per query over the
    whole walk) -> (m, l, acc) with the block folded in. QUANT: the keys and values are int8, and
    KScale / VScale at ``scale_offsets`` [1, N] (``scale_loaded`` [1, N]) their scales
    (``kv_cache``); the integers widen exactly to q's dtype, and the scales multiply the scores
    and the probabilities instead of every element."""
    k = tl.load(K + kv_offsets, mask=loaded, other=0.0).to(q.dtype)  # [N, D]
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if QUANT:
        s = s * tl.load(KScale + scale_offsets, mask=scale_loaded, other=0.0)
    s = tl.where(visible, s * sm_scale, float("-inf"))  # [Q, N]
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m - m_new)
    l = l * alpha + tl.sum(p, 1)
    v = tl.load(V + kv_offsets, mask=loaded, other=0.0).to(q.dtype)  # [N, D]
    weights = p
    if QUANT:
        weights = p * tl.load(VScale + scale_offsets, mask=scale_loaded, other=0.0)
    if IEEE:
        pv = tl.dot(weights.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(weights.to(v.dtype), v)
    return m_new, l, acc * alpha[:, None] + pv
