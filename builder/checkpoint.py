"""Open a Qwen3-VL checkpoint directory, or make the embedded random-weight demo one.

A real checkpoint (a downloaded ``Qwen/Qwen3-VL-2B-Instruct``) and the demo checkpoint go through
the same loading code: the demo is written with ``save_pretrained`` next to the real tokenizer,
chat template and image-processor files that ship with this package (``builder/assets``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"

# Files a checkpoint directory must hold besides its weights.
PROCESSOR_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)

# Random weights drawn with the default initializer_range (0.02) make a tiny model answer every
# prompt with the same token; 0.5 makes greedy tokens depend on the image and the prompt, so a
# parity test can tell a right implementation from a wrong one. The full-size model keeps the
# checkpoint's 0.02: at 0.5 its 24-layer vision tower is chaotic (float32 differs from float64 by
# 44% relative), so no float32 parity check could pass.
SENSITIVE_INIT_RANGE = 0.5


class CheckpointError(ValueError):
    """The checkpoint directory is missing or incomplete."""


def resolve_checkpoint(model: str) -> Path:
    """A local checkpoint directory, or a hub id resolved from the local Hugging Face cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        checkpoint = path
    elif path.exists():
        raise CheckpointError(f"--model {model}: not a directory")
    else:
        try:
            from huggingface_hub import snapshot_download

            checkpoint = Path(snapshot_download(model, local_files_only=True))
        except Exception as exc:  # the hub client raises several unrelated types here
            raise CheckpointError(
                f"--model {model}: no such directory, and not found in the local Hugging Face "
                f"cache ({type(exc).__name__}). Download it first, e.g. "
                f"`huggingface-cli download {model} --local-dir ./{Path(model).name}`"
            ) from None
    missing = [name for name in PROCESSOR_FILES if not (checkpoint / name).is_file()]
    if missing and not (checkpoint / "tokenizer.json").is_file():
        raise CheckpointError(f"{checkpoint}: missing {', '.join(missing)}")
    if not list(checkpoint.glob("*.safetensors")):
        raise CheckpointError(f"{checkpoint}: no *.safetensors weights")
    return checkpoint


def checkpoint_fingerprint(checkpoint: Path) -> dict:
    """SHA-256 of the config and of every weight file, for the build manifest."""

    def sha256(path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        return digest.hexdigest()

    return {
        "path": str(checkpoint.resolve()),
        "config_sha256": sha256(checkpoint / "config.json"),
        "weights_sha256": {p.name: sha256(p) for p in sorted(checkpoint.glob("*.safetensors"))},
    }


def write_processor_files(dest: Path) -> None:
    """Copy the real Qwen3-VL-2B tokenizer, chat template and processor files into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROCESSOR_FILES:
        packed = ASSETS / f"{name}.gz"
        if packed.is_file():
            with gzip.open(packed, "rb") as src, open(dest / name, "wb") as out:
                shutil.copyfileobj(src, out)
        else:
            shutil.copyfile(ASSETS / name, dest / name)


def demo_config(full_size: bool = False):
    """The Qwen3-VL-2B config, or a tiny one of the same model class for tests and the demo."""
    from transformers import Qwen3VLConfig

    config = json.loads((ASSETS / "config.json").read_text())
    if not full_size:
        config["text_config"].update(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            # head_dim / 2 frequencies split over (t, h, w), interleaved as in the real model.
            rope_scaling={"mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"},
        )
        config["vision_config"].update(
            depth=4,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=128,
            deepstack_visual_indexes=[0, 1, 2],
        )
        for part in (config, config["text_config"], config["vision_config"]):
            part["initializer_range"] = SENSITIVE_INIT_RANGE
    return Qwen3VLConfig(**config)


def make_demo_checkpoint(
    dest: Path, *, full_size: bool = False, seed: int = 0, dtype: str = "float32", device: str = "cpu"
) -> Path:
    """Write a random-weight Qwen3-VL checkpoint (tiny by default) with the real processor files.

    device: where the random weights are drawn (a GPU draws the 2B model's in seconds).
    """
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    dest = Path(dest)
    torch.manual_seed(seed)
    config = demo_config(full_size)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(config).to(getattr(torch, dtype))
    model.save_pretrained(dest)
    write_processor_files(dest)
    # save_pretrained rewrites config.json with every default spelled out; keep that one, it is
    # the config the weights were drawn from.
    config.save_pretrained(dest)
    return dest
