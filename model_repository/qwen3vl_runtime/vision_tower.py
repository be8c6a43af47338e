"""The Qwen3-VL vision tower's forward on host-side position inputs (``vision_inputs``).

One forward, two ways to attend within each image: the ONNX export traces it with one SDPA under
a block-diagonal mask (static control flow, any number of images), and the decoder runs it in
PyTorch with ``segment_attention.SegmentAttention``, where images of the same patch count attend
as one batch (no [patches, patches] mask, which 16 images of 784 patches would make a 150M-entry
tensor).

The submodules (norms, MLP, rotary table, mergers) are transformers' ``Qwen3VLVisionModel``'s,
so the weights load by the checkpoint's own names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

# attend(q, k, v, scale) -> out, each [patches, heads, head_dim]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
# rotate(qkv [patches, 3, heads, head_dim], cos, sin) -> (q, k) rotated, [patches, heads, head_dim] each
Rotate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rotate_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' rotary embedding of q and k (the ONNX export's and the CPU's; on the GPU the
    decoder runs ``kernels.vision_rope``, the same math in one kernel)."""
    q, k, _ = qkv.unbind(1)
    return apply_rotary_pos_emb_vision(q, k, cos, sin)


def encode_images(
    visual: nn.Module,
    pixel_values: torch.Tensor,
    pos_interp_indices: torch.Tensor,
    pos_interp_weights: torch.Tensor,
    rotary_pos_ids: torch.Tensor,
    attend: Attend,
    rotate: Rotate = rotate_qk,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Qwen3VLVisionModel.forward`` of ``visual`` with the position work done on the host.

    Returns (image_embeds [N / 4, out_hidden], deepstack [layers, N / 4, out_hidden]) in the
    tower's dtype, as transformers computes them for the same patches.
    """
    proj = visual.patch_embed.proj
    dtype = proj.weight.dtype
    # Conv3d with kernel == stride over one patch is a Linear on the flattened patch.
    x = F.linear(pixel_values.to(dtype), proj.weight.flatten(1), proj.bias)  # [N, D]
    table = visual.pos_embed.weight
    x = x + (F.embedding(pos_interp_indices, table) * pos_interp_weights.to(table.dtype)[:, :, None]).sum(1)
    cos, sin = visual.rotary_pos_emb(x, rotary_pos_ids)  # [N, head_dim] each, float32
    deepstack = []
    for layer, block in enumerate(visual.blocks):
        x = x + _attention(block.attn, block.norm1(x), cos, sin, attend, rotate)
        x = x + block.mlp(block.norm2(x))
        if layer in visual.deepstack_visual_indexes:
            merger = visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(layer)]
            deepstack.append(merger(x))  # [N / 4, out_hidden]
    return visual.merger(x), torch.stack(deepstack)


def _attention(attn: nn.Module, x: torch.Tensor, cos, sin, attend: Attend, rotate: Rotate) -> torch.Tensor:
    """``Qwen3VLVisionAttention.forward`` with its per-image split left to ``attend``."""
    qkv = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1)  # [N, 3, H, hd]
    q, k = rotate(qkv, cos, sin)
    out = attend(q, k, qkv[:, 2], attn.scaling)  # [N, H, hd]
    return attn.proj(out.reshape(x.shape[0], -1))
