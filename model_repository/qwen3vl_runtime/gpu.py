"""Switch a loaded decoder (or vision tower) to its GPU kernels: decode and prompt attention over
the slot cache, fused 8-bit matmuls. The CPU code paths stay the reference they are compared against."""

from __future__ import annotations

import torch
from torch import nn

from .quant import QuantEmbedding, QuantLinear
from .text_model import TextModel


def use_gpu_kernels(model: nn.Module) -> nn.Module:
    if isinstance(model, TextModel):
        from .kernels.decode_attention import decode_attention
        from .kernels.prompt_attention import prompt_attention

        model.decode_attention = decode_attention
        model.prompt_attention = prompt_attention
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            module.matmul = _fast_matmul(module.weight.dtype)
    return model


def _fast_matmul(dtype: torch.dtype):
    if dtype == torch.int8:
        from .kernels.int8_matmul import int8_matmul

        return int8_matmul
    from .kernels.fp8_matmul import fp8_matmul

    return fp8_matmul
