"""What the benchmark scripts share: the long image prompt, random-pixel images (encoded), and
matplotlib when it is there."""

from __future__ import annotations

import io

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
