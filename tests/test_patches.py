"""Image pixels to patch rows: equal, bit for bit, to the Hugging Face image processor's output."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor

from builder.checkpoint import ASSETS
from model_repository.qwen3vl_runtime.patches import PatchMaker

MIN_PIXELS, MAX_PIXELS = 64 * 1024, 1024 * 1024
# Already on the grid, resized down, resized up, odd sizes, a long strip, over the pixel cap.
SIZES = [(448, 448), (320, 224), (640, 256), (37, 91), (1023, 1025), (33, 2000), (1920, 1080), (4000, 3000)]


@pytest.fixture(scope="module")
def processor():
    return AutoImageProcessor.from_pretrained(ASSETS, backend="pil", size={"longest_edge": MAX_PIXELS, "shortest_edge": MIN_PIXELS})


def random_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_patches_equal_the_image_processor(processor, size):
    image = random_image(*size, seed=sum(size))
    pixel_values, grid = PatchMaker(processor, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).make([image])
    want = processor(images=[image], return_tensors="np")
    assert pixel_values.dtype == np.float32 and grid.dtype == np.int64
    np.testing.assert_array_equal(pixel_values, want["pixel_values"])
    np.testing.assert_array_equal(grid, want["image_grid_thw"])


def test_several_images_are_concatenated_in_order(processor):
    images = [random_image(448, 448, 1), random_image(320, 224, 2), random_image(256, 640, 3)]
    pixel_values, grid = PatchMaker(processor, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).make(images)
    want = processor(images=images, return_tensors="np")
    np.testing.assert_array_equal(pixel_values, want["pixel_values"])
    np.testing.assert_array_equal(grid, want["image_grid_thw"])


def test_refuses_what_the_processor_refuses(processor):
    with pytest.raises(ValueError, match="aspect ratio"):
        PatchMaker(processor, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).make([random_image(4000, 16, 0)])
