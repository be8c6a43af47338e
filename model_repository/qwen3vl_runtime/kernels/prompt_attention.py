"""Causal attention of whole prompts over the slot KV cache, for the prefill replayed from CUDA graphs.

A captured prefill cannot batch prompts by length on the host (``SegmentAttention`` does, one SDPA
call per distinct length): the graph is fixed, the prompts are not. It used the decode kernel with
one query per row instead, so each row read its prompt's keys alone, and its two query heads were
padded to a 16-row product. On the H100 (run 21, scripts/profile_prefill.py) sixteen 243-token
image prompts took 58.1 ms from the graphs against 46.7 eagerly (int8; bf16 55.9 against 44.1),
while the eager prefill's attention kernels took 0.87 ms in all.

Here one program takes a tile of up to ``BLOCK_M`` consecutive rows of one prompt and one KV head
(its query heads stacked, GQA), and walks the slot's keys once for the whole tile with an online
softmax, flash-attention style: the keys are read once per tile, not once per row. The tiles come
in a device table (first row, rows, slot) that the host fills before each replay, so the grid is
fixed and the kernel can be captured. The table names every row, padding included (on a scratch
slot), so no row of the output is left unwritten. On the H100 (run 22, the same script, one
session) sixteen such prompts replay in 47.8 ms against the per-row attention's 58.6, level with
the eager prefill (47.6).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kv_cache import LayerCache
from .online_softmax import attend_block
from .pdl import launch_args, wait_for_previous

BLOCK_M = 64  # query rows (tokens) of one prompt per program
BLOCK_N = 64  # keys per inner step (16-bit); float32 takes half, so that two stages of keys and
# values beside the queries stay within a Hopper SM's shared memory at head_dim 128
TILE_FIELDS = 3  # first row, rows, slot


@triton.jit
def _prompt_attention_kernel(
    Q, K, V, KScale, VScale, Out, Tiles, CachePositions,
    sm_scale,
    stride_qt, stride_qh,
    stride_ks, stride_kh, stride_kl, stride_ss, stride_sh,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, FIELDS: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (tile, KV head). Query i of the block is row first + i // GROUP, head
    kv_head * GROUP + i % GROUP; each row attends to its slot's keys 0..CachePositions[row]."""
    wait_for_previous(PDL)
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    first = tl.load(Tiles + tile * FIELDS)
    count = tl.load(Tiles + tile * FIELDS + 1)
    if count > 0:
        slot = tl.load(Tiles + tile * FIELDS + 2).to(tl.int64)
        i = tl.arange(0, BLOCK_Q)
        r = i // GROUP
        live = (r < count) & (i < BLOCK_M * GROUP)
        rows = (first + r).to(tl.int64)
        heads = kv_head * GROUP + i % GROUP
        d = tl.arange(0, HEAD_DIM)
        q_offsets = rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :]
        q = tl.load(Q + q_offsets, mask=live[:, None], other=0.0)
        last = tl.load(CachePositions + rows, mask=live, other=0)  # each row's newest key
        end = tl.max(last, 0) + 1
        m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
        base = slot * stride_ks + kv_head * stride_kh
        scale_base = slot * stride_ss + kv_head * stride_sh
        for start in range(0, end, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            kv_offsets = base + offs[:, None] * stride_kl + d[None, :]
            # causal within the prompt; key 0 is always in, so no row's sum stays zero
            m, l, acc = attend_block(q, K, V, kv_offsets, offs[:, None] < end, offs[None, :] <= last[:, None], m, l, acc, sm_scale, IEEE,
                                     KScale, VScale, scale_base + offs[None, :], offs[None, :] < end, QUANT)  # fmt: skip
        out = acc / l[:, None]
        tl.store(Out + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty), mask=live[:, None])


def max_tiles(rows: int, prompts: int) -> int:
    """Tiles that ``tile_table`` may need for ``rows`` rows in ``prompts`` prompts plus one run of
    padding rows: each prompt's last tile may be partial."""
    return triton.cdiv(rows, BLOCK_M) + prompts + 1


def tile_table(slots: list[int], lengths: list[int], rows: int, padding_slot: int, max_prompts: int) -> torch.Tensor:
    """[max_tiles(rows, max_prompts), TILE_FIELDS] int32 on the host: the prompts laid end to
    end from row 0, each in tiles of its own slot, then rows sum(lengths)..rows-1 (padding) in
    tiles of ``padding_slot``; the entries left have no rows (a captured grid runs them all, so a
    table for fewer prompts than it was captured for must still fill it)."""
    table = torch.zeros(max_tiles(rows, max_prompts), TILE_FIELDS, dtype=torch.int32)
    entries, first = [], 0
    for slot, n in [*zip(slots, lengths), (padding_slot, rows - sum(lengths))]:
        entries += [(start, min(BLOCK_M, first + n - start), slot) for start in range(first, first + n, BLOCK_M)]
        first += n
    if entries:
        table[: len(entries)] = torch.tensor(entries, dtype=torch.int32)
    return table


def prompt_attention(q, cache: LayerCache, token_slots, cache_positions, tiles) -> torch.Tensor:
    """q: [T, H, D], each row's keys and values already in the layer's cache (K and V [slots, Hkv,
    max_len, D] contiguous, int8 with scales or q's dtype); cache_positions: [T] each row's
    position in its slot; tiles: a ``tile_table`` on q's device -> [T, H, D]. Same result as
    ``sdpa_decode_attention(q, cache, token_slots, cache_positions + 1)`` (token_slots is what the
    tiles say, kept for that contract)."""
    rows, heads, head_dim = q.shape
    k_cache, v_cache = cache.k, cache.v
    k_scale, v_scale = cache.kernel_scales()
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    q = q.contiguous()
    ieee = q.dtype == torch.float32
    _prompt_attention_kernel[(tiles.shape[0], kv_heads)](
        q, k_cache, v_cache, k_scale, v_scale, out, tiles, cache_positions,
        head_dim**-0.5,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_scale.stride(0), k_scale.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_Q=triton.next_power_of_2(BLOCK_M * group), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N // 2 if ieee else BLOCK_N,
        HEAD_DIM=head_dim, FIELDS=TILE_FIELDS, IEEE=ieee, QUANT=cache.quantized, num_warps=8, num_stages=2, **launch_args(q),
    )  # fmt: skip
    return out
