"""The Qwen3-VL language decoder in plain PyTorch, with a slot-based KV cache.

Same math as transformers' ``Qwen3VLTextModel`` (RMSNorm in float32, q/k norms per head,
interleaved M-RoPE, deepstack added after the first decoder layers), written for serving:
prefill of one sequence into a cache slot, and one decode step for a batch of slots.
During decode all three M-RoPE axes carry the same position, so decode is plain 1-D RoPE
at ``token index + rope_delta``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import LayerCache


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config: dict) -> "TextConfig":
        """From a checkpoint's config.json (the whole dict, or its ``text_config``)."""
        text = config.get("text_config", config)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if rope.get("mrope_interleaved") is False:
            raise ValueError("only interleaved M-RoPE (Qwen3-VL) is supported")
        return cls(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            num_kv_heads=text["num_key_value_heads"],
            head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
            rms_norm_eps=text["rms_norm_eps"],
            rope_theta=rope.get("rope_theta", text.get("rope_theta")),
            mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
            tie_word_embeddings=config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)),
        )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MRoPE(nn.Module):
    """cos/sin tables for (t, h, w) positions, frequencies interleaved across the three axes.

    The frequency tables are plain float32 attributes, not buffers: ``Module.to(bfloat16)`` must
    not round them (transformers computes RoPE angles in float32), and they are computed, never
    loaded, so they need no place in the state dict.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        half = config.head_dim // 2
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float, device="cpu") / config.head_dim
        self.inv_freq = 1.0 / (config.rope_theta**exponents)  # [half]
        # Frequency j follows axis h when j % 3 == 1, axis w when j % 3 == 2 (within each axis's
        # section), and axis t otherwise: transformers' interleaved layout.
        self.axis = torch.zeros(half, dtype=torch.long, device="cpu")
        for dim, offset in ((1, 1), (2, 2)):
            self.axis[offset : config.mrope_section[dim] * 3 : 3] = dim

    def prepare_decode(self, max_positions: int, device, dtype: torch.dtype) -> None:
        """Tabulate cos/sin of the 1-D positions 0..max_positions-1 so that ``decode`` is one lookup
        instead of five to seven small kernels per decode step; the values are ``forward``'s, computed by
        the same operations. A table that already covers the range is kept (runners may share a model)."""
        table = getattr(self, "_decode_table", None)
        if table is not None and table.dtype == dtype and table.device == torch.device(device) and table.shape[1] >= max_positions:
            return
        cos, sin = self.forward(torch.arange(max_positions, device=device), dtype)
        self._decode_table = torch.stack((cos, sin))  # [2, positions, head_dim]

    def decode(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` for 1-D positions [L] (each in the prepared range), from the table if prepared."""
        table = getattr(self, "_decode_table", None)
        if table is None or table.dtype != dtype or table.device != positions.device:
            return self.forward(positions, dtype)
        cos, sin = table[:, positions].unbind(0)
        return cos, sin

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [3, L] (prefill) or [L] (decode, all axes equal) -> cos, sin: [L, head_dim]."""
        if self.inv_freq.device != positions.device:  # once, on the first call on a device
            self.inv_freq, self.axis = self.inv_freq.to(positions.device), self.axis.to(positions.device)
        if positions.dim() == 1:
            freqs = positions[:, None].float() * self.inv_freq  # [L, half]
        else:
            per_axis = positions[..., None].float() * self.inv_freq  # [3, L, half]
            freqs = per_axis.gather(0, self.axis.expand(1, positions.shape[1], -1)).squeeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [L, H, D]; cos/sin: [L, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def sdpa_decode_attention(q, cache: LayerCache, slots, lengths) -> torch.Tensor:
    """Decode attention in plain PyTorch (CPU, and the reference for the GPU kernel).

    q: [B, H, D]; cache: one layer's (``kv_cache``); lengths: [B] valid keys per sequence (the new
    token's included) -> [B, H, D]. Pads to the longest sequence in the batch.
    """
    span = int(lengths.max())
    keys, values = cache.read((slots, slice(None), slice(None, span)), q.dtype)  # [B, Hkv, span, D]
    mask = torch.arange(span, device=q.device)[None, :] < lengths[:, None]  # [B, span]
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None, None], enable_gqa=True)
    return out[:, :, 0]


def sdpa_prompt_attention(q, cache: LayerCache, token_slots, cache_positions, tiles) -> torch.Tensor:
    """Causal attention of prompt rows already in the cache, in plain PyTorch (the reference for
    ``kernels.prompt_attention``, whose schedule ``tiles`` is): q [T, H, D], each row over its
    slot's keys 0..cache_positions[row] -> [T, H, D]."""
    return sdpa_decode_attention(q, cache, token_slots, cache_positions + 1)


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        # q, k and v projections fused into one matmul (rows in that order).
        self.qkv_proj = nn.Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [L, hidden] -> q: [L, H, D], k and v: [L, Hkv, D] with RoPE applied to q and k."""
        n = x.shape[0]
        qkv = self.qkv_proj(x).view(n, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=1)
        q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def prefill(self, x, cos, sin, cache: LayerCache, slot: int, start: int) -> torch.Tensor:
        """Attend L new tokens at positions start..start+L of one slot (causal), filling its cache."""
        n = x.shape[0]
        q, k, v = self.project(x, cos, sin)
        end = start + n
        cache.write((slot, slice(None), slice(start, end)), k.transpose(0, 1), v.transpose(0, 1))
        keys, values = cache.read((slot, slice(None), slice(None, end)), q.dtype)  # [Hkv, end, D], as cached
        if start == 0:  # a whole prompt: the fused causal kernels apply
            out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, is_causal=True, enable_gqa=True)
        else:  # token i (absolute start + i) sees keys 0..start + i
            mask = torch.ones(n, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))  # out: [H, L, D]

    def decode(self, x, cos, sin, cache: LayerCache, slots, lengths, attend) -> torch.Tensor:
        """One new token per sequence. x: [B, hidden]; slots, lengths: [B] (tokens already cached).

        No host synchronisation with a GPU ``attend``: the step can be captured in a CUDA graph.
        """
        b = x.shape[0]
        q, k, v = self.project(x, cos, sin)
        cache.write((slots, slice(None), lengths), k, v)
        return self.o_proj(attend(q, cache, slots, lengths + 1).reshape(b, -1))


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        # gate and up projections fused into one matmul (rows in that order).
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        x = x + attend(self.self_attn, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """Parameter names are the checkpoint's ``model.language_model.*`` (prefix removed), with q/k/v
    fused into ``qkv_proj`` and gate/up into ``gate_up_proj`` (see ``decoder_weights``)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = MRoPE(config)
        # Decode attention, and a captured prefill's prompt attention, over the slot cache; the
        # runner swaps in GPU kernels on CUDA (gpu.use_gpu_kernels).
        self.decode_attention = sdpa_decode_attention
        self.prompt_attention = sdpa_prompt_attention
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> [N, vocab]; the tied head reuses the (maybe quantized) embedding."""
        head = getattr(self, "lm_head", None)
        if head is not None:
            return head(hidden)
        if isinstance(self.embed_tokens, nn.Embedding):
            return F.linear(hidden, self.embed_tokens.weight)
        return self.embed_tokens.logits(hidden)  # a quantized table (qwen3vl_runtime.quant)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    @torch.inference_mode()
    def prefill(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        kv: list[LayerCache],
        slot: int,
        start: int = 0,
        visual_mask: torch.Tensor | None = None,
        deepstack: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run L prompt tokens of one sequence; returns the logits of the last one: [vocab]
        (of every one, [L, vocab], with ``all_logits``).

        embeds: [L, hidden] (image rows already replaced); positions: [3, L];
        visual_mask: [L] bool, the image rows; deepstack: [layers, visual rows, hidden].
        """
        cos, sin = self.rope(positions, embeds.dtype)
        x = embeds
        for i, (layer, cache) in enumerate(zip(self.layers, kv)):
            x = layer(x, lambda attn, h: attn.prefill(h, cos, sin, cache, slot, start))
            if deepstack is not None and i < deepstack.shape[0]:
                x = x.clone()
                x[visual_mask] += deepstack[i].to(x.dtype)
        if all_logits:
            return self.logits(self.norm(x))
        return self.logits(self.norm(x[-1:]))[0]

    def new_cache(self, slots: int, max_len: int, device=None, *, quantized: bool = False) -> list[LayerCache]:
        """A zeroed KV cache, one ``LayerCache`` per layer: K and V [slots, kv heads, max_len,
        head_dim] in the model's dtype, or int8 with a scale per token and head (``quantized``)."""
        c, like = self.config, self.norm.weight
        make = lambda: LayerCache.empty(slots, c.num_kv_heads, max_len, c.head_dim, dtype=like.dtype, quantized=quantized, device=device or like.device)  # noqa: E731
        return [make() for _ in range(c.num_layers)]

    def sequence_logits(self, input_ids: torch.Tensor, quantized_kv: bool = False) -> torch.Tensor:
        """Teacher-forced logits of a text-only sequence: [L] -> [L, vocab] (accuracy checks), over
        a cache in the model's dtype or int8 (``quantized_kv``)."""
        input_ids = input_ids.to(self.norm.weight.device)
        positions = torch.arange(len(input_ids), device=input_ids.device).expand(3, -1)
        kv = self.new_cache(1, len(input_ids), quantized=quantized_kv)
        return self.prefill(self.embed(input_ids), positions, kv, slot=0, all_logits=True)

    @torch.inference_mode()
    def decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: list[LayerCache],
        slots: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        """One step for a batch: input_ids, positions (1-D RoPE), slots, lengths: [B] -> [B, vocab]."""
        x = self.embed(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for layer, cache in zip(self.layers, kv):
            x = layer(x, lambda attn, h: attn.decode(h, cos, sin, cache, slots, lengths, self.decode_attention))
        return self.logits(self.norm(x))
