"""Write the decoder's weights folder (see ``qwen3vl_runtime.decoder_weights``) from a checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from model_repository.qwen3vl_runtime.decoder_weights import (
    SETTINGS_FILE,
    WEIGHTS_FILE,
    decoder_tensor_name,
    fuse_projections,
)


def read_decoder_state(checkpoint: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The text model's tensors from every safetensors shard, cast to ``dtype`` one at a time."""
    from safetensors import safe_open

    state = {}
    for shard in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                ours = decoder_tensor_name(name)
                if ours is not None:
                    state[ours] = f.get_tensor(name).to(dtype)
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
    (dest / SETTINGS_FILE).write_text(json.dumps({"quantization": quantization, "dtype": dtype}, indent=2) + "\n")
