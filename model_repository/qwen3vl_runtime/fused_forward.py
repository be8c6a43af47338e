"""The decoder's forward on CUDA with fused kernels: 9 kernels per layer instead of ~55.

Same math as ``TextModel.prefill`` / ``TextModel.decode`` (their CPU code is the reference this is
tested against); the residual stream is carried with its pending update so each residual add is
fused into the next RMSNorm.
"""

from __future__ import annotations

import torch

from .host_to_device import to_device
from .kernels.fused import add_rmsnorm, qk_norm_rope_cache, silu_mul
from .segment_attention import SegmentAttention
from .text_model import TextModel


def _layers(model: TextModel, x, cos, sin, kv, slots, cache_positions, attend, after_layer=None, keep_kv=False) -> torch.Tensor:
    """x: [M, hidden] embeddings -> final normed hidden [M, hidden]. attend(i, q, k, v) -> [M, H, D],
    k and v this step's keys and values with keep_kv, repeated per query head, [M, H, D] (else
    None; they are in the cache)."""
    c = model.config
    delta = None
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        h, x = add_rmsnorm(x, delta, *_norm(layer.input_layernorm))
        q, k, v = qk_norm_rope_cache(
            attn.qkv_proj(h), attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps,
            cos, sin, kv[i], slots, cache_positions, c.num_heads, c.num_kv_heads, keep_kv,
        )  # fmt: skip
        h, x = add_rmsnorm(x, attn.o_proj(attend(i, q, k, v).reshape(len(q), -1)), *_norm(layer.post_attention_layernorm))
        delta = mlp.down_proj(silu_mul(mlp.gate_up_proj(h)))
        if after_layer is not None:
            x, delta = after_layer(i, x, delta)
    h, _ = add_rmsnorm(x, delta, *_norm(model.norm))
    return h


def _norm(norm):
    return norm.weight, norm.eps


def fused_decode(model: TextModel, input_ids, positions, kv, slots, lengths) -> torch.Tensor:
    """Same contract as ``TextModel.decode``: one token per sequence -> logits [B, vocab]."""
    x = model.embed(input_ids)
    cos, sin = model.rope.decode(positions, x.dtype)
    valid = lengths + 1  # the new token's key is attended to as well

    def attend(i, q, k, v):
        return model.decode_attention(q, kv[i], slots, valid)

    return model.logits(_layers(model, x, cos, sin, kv, slots, lengths, attend))


def prompt_rows(slots: list[int], lengths: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For prompts concatenated row after row: each row's KV slot and position in its prompt, and
    each prompt's last row. Built on the host, one queued copy each (a launch per prompt adds up
    in a prefill of many prompts)."""
    token_slots = to_device(torch.repeat_interleave(torch.tensor(slots), torch.tensor(lengths)), device)
    cache_positions = to_device([torch.arange(n) for n in lengths], device)
    return token_slots, cache_positions, to_device(torch.tensor(lengths).cumsum(0) - 1, device)


def fused_prefill(model: TextModel, kv, embeds, positions, slots: list[int], lengths: list[int], visual_rows=None, deepstack=None) -> torch.Tensor:
    """Whole prompts of several sequences in one pass -> each one's last-token logits [S, vocab].

    embeds: [T, hidden] (the prompts concatenated, image rows replaced); positions: [3, T];
    slots, lengths: one per sequence; visual_rows: [image rows] the rows of embeds that are image
    tokens, on embeds' device; deepstack: [layers, image rows, hidden]. No host synchronisation.
    """
    device = embeds.device
    cos, sin = model.rope(positions, embeds.dtype)
    token_slots, cache_positions, last_rows = prompt_rows(slots, lengths, device)
    segments = SegmentAttention(lengths, device, causal=True)

    def attend(i, q, k, v):  # [T, H, D]; each prompt causal over its own keys, prompts of one length batched
        return segments(q, k, v)

    def add_deepstack(i, x, delta):
        if deepstack is None or i >= deepstack.shape[0]:
            return x, delta
        x = x + delta  # materialise the residual stream, then add the image features
        x.index_add_(0, visual_rows, deepstack[i].to(x.dtype))
        return x, None

    hidden = _layers(model, embeds, cos, sin, kv, token_slots, cache_positions, attend, add_deepstack, keep_kv=True)
    return model.logits(hidden[last_rows])


def static_prefill(model: TextModel, kv, embeds, positions, token_slots, cache_positions, visual_rows, deepstack, last_rows, tiles) -> torch.Tensor:
    """Prefill with fixed-size inputs and no host synchronisation, so it can be captured in a CUDA graph.

    embeds: [T + 1, hidden] where row T (and any padding) is a dump row; positions: [3, T + 1];
    token_slots, cache_positions: [T + 1] (padding: a scratch slot, position 0); visual_rows: [R]
    rows of embeds that hold image tokens (padding: T); deepstack: [layers, R, hidden] (padding:
    zeros); last_rows: [S] each prompt's last row (padding: T); tiles: the rows in tiles of one
    prompt (``kernels.prompt_attention.tile_table``) -> logits [S, vocab].
    Each token attends over its own slot's keys 0..position, written just before by the same
    layer: ``model.prompt_attention``, tile by tile, no per-prompt loop on the host.
    """
    cos, sin = model.rope(positions, embeds.dtype)  # [3, T + 1]: M-RoPE, not the 1-D table

    def attend(i, q, k, v):
        return model.prompt_attention(q, kv[i], token_slots, cache_positions, tiles)

    def add_deepstack(i, x, delta):
        if i >= deepstack.shape[0]:
            return x, delta
        x = x + delta
        x.index_add_(0, visual_rows, deepstack[i].to(x.dtype))
        return x, None

    hidden = _layers(model, embeds, cos, sin, kv, token_slots, cache_positions, attend, add_deepstack)
    return model.logits(hidden[last_rows])
