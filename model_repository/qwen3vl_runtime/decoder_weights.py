"""The decoder's weights folder inside a built repository: what the builder writes, what serves.

Layout of ``language_model/1/decoder/``:
  config.json         the checkpoint's config (text_config used)
  decoder.json        {"quantization": "none"|"int8"|"fp8", "dtype": "float32"|"bfloat16"|...}
  model.safetensors   text-model tensors, names without the ``model.language_model.`` prefix,
                      q/k/v and gate/up fused (FUSED_PROJECTIONS); quantized weights carry a
                      ``<name>.weight_scale`` beside them
  vision.safetensors  only with ``--vision-backend decoder``: the vision tower's tensors, names
                      without the ``model.visual.`` prefix, Linear weights quantized the same way
                      when decoder.json says ``"vision_quantization": "int8"``
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .text_model import TextConfig, TextModel

CHECKPOINT_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."
WEIGHTS_FILE = "model.safetensors"
VISION_WEIGHTS_FILE = "vision.safetensors"
SETTINGS_FILE = "decoder.json"


def decoder_tensor_name(checkpoint_name: str) -> str | None:
    """The decoder's name for a checkpoint tensor, or None if it is not a decoder tensor."""
    if checkpoint_name.startswith(CHECKPOINT_PREFIX):
        return checkpoint_name[len(CHECKPOINT_PREFIX) :]
    if checkpoint_name == "lm_head.weight":
        return checkpoint_name
    return None


def vision_tensor_name(checkpoint_name: str) -> str | None:
    """The vision tower's name for a checkpoint tensor, or None if it is not a vision tensor."""
    return checkpoint_name[len(VISION_PREFIX) :] if checkpoint_name.startswith(VISION_PREFIX) else None


# Checkpoint projections stored fused, in this row order (one matmul instead of three or two).
FUSED_PROJECTIONS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate each layer's q/k/v and gate/up weights (decoder names, float tensors)."""
    fused = dict(state)
    layers = {name.split(".")[1] for name in state if name.startswith("layers.")}
    for i in sorted(layers, key=int):
        for target, parts in FUSED_PROJECTIONS.items():
            names = [f"layers.{i}.{part}.weight" for part in parts]
            fused[f"layers.{i}.{target}.weight"] = torch.cat([fused.pop(n) for n in names], dim=0)
    return fused


def read_settings(folder: Path) -> dict:
    return json.loads((Path(folder) / SETTINGS_FILE).read_text())


def update_settings(folder: Path, **values) -> None:
    """Merge ``values`` into decoder.json (the text and vision weights are written separately)."""
    path = Path(folder) / SETTINGS_FILE
    settings = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**settings, **values}, indent=2) + "\n")


def load_text_model(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> TextModel:
    """Build the decoder from a weights folder, swapping in quantized layers where it has them."""
    from safetensors.torch import load_file

    folder = Path(folder)
    settings = read_settings(folder)
    config = TextConfig.from_hf(json.loads((folder / "config.json").read_text()))
    dtype = dtype or getattr(torch, settings["dtype"])
    state = load_file(folder / WEIGHTS_FILE, device=str(device))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = TextModel(config)
    _fill(model, state, settings["quantization"])
    # Float tensors take the serving dtype; the quantized modules keep their 8-bit weights.
    model.to(device=device, dtype=dtype)
    return model.eval()


def _fill(module: torch.nn.Module, state: dict[str, torch.Tensor], mode: str) -> None:
    """Give a module built on the meta device the loaded tensors, swapping in the 8-bit layers
    for which ``state`` has quantized weights."""
    if mode != "none":
        from .quant import swap_in_quantized

        swap_in_quantized(module, state, mode)
    module.load_state_dict(state, strict=True, assign=True)


def load_vision_tower(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """transformers' ``Qwen3VLVisionModel`` from the folder's vision weights, or None when the
    repository runs the tower in a model of its own (no ``vision.safetensors``)."""
    from safetensors.torch import load_file
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel, Qwen3VLVisionRotaryEmbedding

    folder = Path(folder)
    if not (folder / VISION_WEIGHTS_FILE).is_file():
        return None
    settings = read_settings(folder)
    config = Qwen3VLVisionConfig(**json.loads((folder / "config.json").read_text())["vision_config"])
    state = load_file(folder / VISION_WEIGHTS_FILE, device=str(device))
    with torch.device("meta"):
        visual = Qwen3VLVisionModel._from_config(config)
    _fill(visual, state, settings.get("vision_quantization", "none"))
    # The rotary table is computed, not stored (on the meta device it holds no data): rebuilt
    # after the cast, in float32 as transformers keeps it.
    del visual.rotary_pos_emb
    visual.to(device=device, dtype=dtype or getattr(torch, settings["dtype"]))
    visual.rotary_pos_emb = Qwen3VLVisionRotaryEmbedding(config).to(device)
    return visual.eval()
