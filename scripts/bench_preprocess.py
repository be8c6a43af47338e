"""CPU cost of the preprocess model's work per request, and of the image processor it replaces.

    python scripts/bench_preprocess.py [--checkpoint DIR] [--repeat 50] [--out bench_preprocess.json]

Times, on this machine's CPU: the whole ``Preprocessor`` call (decode, patches, chat template,
tokenizer, M-RoPE, vision position inputs) for a 448 px PNG, the same as JPEG, a 1920x1080 JPEG and
a text-only prompt, each with the images as bytes (for a decoder that runs the tower), as floats
(for the ONNX encoder), and as floats from the Hugging Face image processor (PIL backend) in
``PatchMaker``'s place (what the preprocess model ran before it; the same arrays); and the two
alone on the 448 px image. Prints a table and writes JSON.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import checkpoint_cli, encoded_image, median_ms, write_table  # noqa: E402

from model_repository.qwen3vl_runtime.patches import PatchMaker  # noqa: E402
from model_repository.qwen3vl_runtime.preprocessing import PreprocessLimits, Preprocessor  # noqa: E402

LIMITS = PreprocessLimits(max_context=4096, max_pixels=1024 * 1024, min_pixels=64 * 1024, max_images=4, max_source_pixels=64_000_000)
PROMPT = "Describe this image in detail."


class ProcessorPatches:
    """``PatchMaker``'s interface over the image processor itself: the preprocess before it."""

    def __init__(self, processor):
        self.processor = processor

    def make(self, images):
        out = self.processor(images=images, return_tensors="np")
        return out["pixel_values"].astype(np.float32), out["image_grid_thw"].astype(np.int64)

    def pixel_values(self, pixel_values):
        return pixel_values  # ``make`` gave floats already


def main() -> int:
    return checkpoint_cli(__doc__, run, default_out="bench_preprocess.json", repeat=50)


def run(checkpoint: Path, args) -> int:
    from transformers import AutoImageProcessor

    size = {"longest_edge": LIMITS.max_pixels, "shortest_edge": LIMITS.min_pixels}
    processor = AutoImageProcessor.from_pretrained(checkpoint, backend="pil", size=size)
    preprocess = Preprocessor(checkpoint, LIMITS, pixel_bytes=True)
    as_floats, before = (Preprocessor(checkpoint, LIMITS, pixel_bytes=False) for _ in range(2))
    before.patches = ProcessorPatches(processor)
    patches = PatchMaker(processor, min_pixels=LIMITS.min_pixels, max_pixels=LIMITS.max_pixels)
    image = Image.open(io.BytesIO(encoded_image(448, 448, "PNG"))).convert("RGB")
    requests = {
        "448 px PNG": [encoded_image(448, 448, "PNG")],
        "448 px JPEG": [encoded_image(448, 448, "JPEG")],
        "1920x1080 JPEG": [encoded_image(1920, 1080, "JPEG")],
        "text only": [],
    }
    cases = {}
    for name, images in requests.items():
        cases[f"preprocess, {name}"] = lambda images=images: preprocess(PROMPT, images)
        cases[f"preprocess, {name}, as floats"] = lambda images=images: as_floats(PROMPT, images)
        cases[f"preprocess, {name}, with the image processor"] = lambda images=images: before(PROMPT, images)
    cases["image processor (transformers, PIL), 448 px"] = lambda: processor(images=[image], return_tensors="np")
    cases["PatchMaker, 448 px"] = lambda: patches.make([image])
    cases["PatchMaker, 448 px, as floats"] = lambda: patches.pixel_values(patches.make([image])[0])
    rows = {name: round(median_ms(call, args.repeat), 2) for name, call in cases.items()}
    write_table(args.out, ("step", "median ms"), "median_ms", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
