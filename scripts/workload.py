"""What the benchmark scripts share: the long image prompt, random-pixel images (encoded),
matplotlib when it is there, and the header of a GPU run's JSON report."""

from __future__ import annotations

import datetime
import io
import json
import sys
from pathlib import Path

import numpy as np

PROMPT = (
    "Look at this picture carefully and describe every object you can see, their colours, positions "
    "and what they might be used for, in plain words, as a short list of numbered points."
)


def pyplot():
    """matplotlib's pyplot drawing to files, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def encoded_image(width: int = 448, height: int = 448, fmt: str = "PNG", seed: int = 0) -> bytes:
    """Random pixels (the worst case for PNG and JPEG sizes), encoded as a client would send them."""
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_gpu_report(path: Path, results: list[dict]) -> None:
    """The JSON every GPU script writes: machine (the CUDA device), date, command, torch, results."""
    import torch

    report = {
        "machine": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "results": results,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
