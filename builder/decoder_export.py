"""Write the decoder's weights folder (see ``qwen3vl_runtime.decoder_weights``) from a checkpoint:
the text model, and with ``--vision-backend decoder`` the vision tower beside it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from model_repository.qwen3vl_runtime.decoder_weights import (
    VISION_WEIGHTS_FILE,
    WEIGHTS_FILE,
    decoder_tensor_name,
    fuse_projections,
    update_settings,
    vision_tensor_name,
)


def read_state(checkpoint: Path, dtype: torch.dtype, rename: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """The tensors ``rename`` keeps (under its names) from every safetensors shard, cast to
    ``dtype`` one at a time."""
    from safetensors import safe_open

    state = {}
    for shard in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                ours = rename(name)
                if ours is not None:
                    state[ours] = f.get_tensor(name).to(dtype)
    return state


def read_decoder_state(checkpoint: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The text model's tensors, under the decoder's names."""
    state = read_state(checkpoint, dtype, decoder_tensor_name)
    if "embed_tokens.weight" not in state:
        raise ValueError(f"{checkpoint}: no model.language_model.* tensors; is this a Qwen3-VL checkpoint?")
    return state


def is_matrix(name: str, tensor: torch.Tensor) -> bool:
    """Which decoder tensors are quantized: every Linear weight and the (tied) embedding table."""
    return tensor.ndim == 2 and tensor.is_floating_point() and name.endswith(".weight")


def write_decoder(checkpoint: Path, dest: Path, *, quantization: str, dtype: str) -> None:
    """Write config, settings and (maybe quantized) weights into ``dest``."""
    from safetensors.torch import save_file

    from .quantize import quantize_state_dict

    dest.mkdir(parents=True, exist_ok=True)
    state = read_decoder_state(checkpoint, getattr(torch, dtype))
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    if config.get("tie_word_embeddings", True):
        state.pop("lm_head.weight", None)  # some exports store the tied head twice
    state = fuse_projections(state)
    stored = state if quantization == "none" else quantize_state_dict(state, quantization, should_quantize=is_matrix)
    save_file({k: v.contiguous() for k, v in stored.items()}, dest / WEIGHTS_FILE)
    shutil.copyfile(Path(checkpoint) / "config.json", dest / "config.json")
    update_settings(dest, quantization=quantization, dtype=dtype)


def is_vision_linear(name: str, tensor: torch.Tensor) -> bool:
    """Which vision tensors are quantized: the Linear weights of the blocks and mergers (the
    position table is an embedding read 4 rows per patch, and the patch embedding a Conv3d)."""
    return tensor.ndim == 2 and tensor.is_floating_point() and name.endswith(".weight") and not name.startswith("pos_embed")


def write_vision(checkpoint: Path, dest: Path, *, quantization: str, dtype: str) -> None:
    """Write the vision tower's (maybe int8) weights into the decoder's folder ``dest``."""
    from safetensors.torch import save_file

    from .quantize import quantize_state_dict

    dest.mkdir(parents=True, exist_ok=True)
    state = read_state(checkpoint, getattr(torch, dtype), vision_tensor_name)
    if "patch_embed.proj.weight" not in state:
        raise ValueError(f"{checkpoint}: no model.visual.* tensors; is this a Qwen3-VL checkpoint?")
    if quantization != "none":
        state = quantize_state_dict(state, quantization, should_quantize=is_vision_linear)
    save_file({k: v.contiguous() for k, v in state.items()}, dest / VISION_WEIGHTS_FILE)
    shutil.copyfile(Path(checkpoint) / "config.json", dest / "config.json")
    update_settings(dest, vision_quantization=quantization, dtype=dtype)
