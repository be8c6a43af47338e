"""Image pixels to patch rows: equal, bit for bit, to the Hugging Face image processor's output,
whether the floats are made from the patch bytes on the host (numpy) or in the decoder (torch)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor

from builder.checkpoint import ASSETS
from model_repository.qwen3vl_runtime.patches import PatchMaker, pixel_table

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
    patches = PatchMaker(processor, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    patch_bytes, grid = patches.make([image])
    want = processor(images=[image], return_tensors="np")
    assert patch_bytes.dtype == np.uint8 and grid.dtype == np.int64
    assert patch_bytes.shape == (want["pixel_values"].shape[0], 3 * 16 * 16)  # one frame: an eighth of the floats' bytes
    pixel_values = patches.pixel_values(patch_bytes)
    assert pixel_values.dtype == np.float32
    np.testing.assert_array_equal(pixel_values, want["pixel_values"])
    np.testing.assert_array_equal(grid, want["image_grid_thw"])


def test_several_images_are_concatenated_in_order(processor):
    images = [random_image(448, 448, 1), random_image(320, 224, 2), random_image(256, 640, 3)]
    patches = PatchMaker(processor, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    patch_bytes, grid = patches.make(images)
    want = processor(images=images, return_tensors="np")
    np.testing.assert_array_equal(patches.pixel_values(patch_bytes), want["pixel_values"])
    np.testing.assert_array_equal(grid, want["image_grid_thw"])


def test_refuses_what_the_processor_refuses(processor):
    with pytest.raises(ValueError, match="aspect ratio"):
        PatchMaker(processor, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).make([random_image(4000, 16, 0)])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_decoders_lookup_equals_the_image_processor(processor, dtype):
    """The decoder's own map from bytes to floats (``engine.vision.PixelValues``, torch, on the
    CPU here and on the GPU in service): the processor's floats, cast to the tower's dtype."""
    import torch

    from model_repository.qwen3vl_runtime.engine.vision import PixelValues

    images = [random_image(448, 448, 4), random_image(640, 256, 5)]
    patch_bytes, _ = PatchMaker(processor, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).make(images)
    to_floats = PixelValues(pixel_table(processor), processor.temporal_patch_size, torch.device("cpu"), getattr(torch, dtype))
    got = to_floats(torch.from_numpy(patch_bytes))
    want = torch.from_numpy(processor(images=images, return_tensors="np")["pixel_values"]).to(getattr(torch, dtype))
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
