"""The vision tower's graph buckets: grouping by image size, padding, chunking and reassembly.

The graphs themselves need CUDA (tests/test_gpu.py compares them with the eager tower there);
here each bucket's padded call runs eagerly (``capture=False``) on the tiny checkpoint's tower, so
everything around the replay is checked on the CPU against one eager call of the same images.
"""

from __future__ import annotations

import numpy as np
import pytest

from model_repository.qwen3vl_runtime.engine import vision_graphs
from model_repository.qwen3vl_runtime.engine.vision import ImageEncoder, ImageInputs
from model_repository.qwen3vl_runtime.engine.vision_graphs import GraphedTower
from model_repository.qwen3vl_runtime.patches import checkpoint_pixel_table
from model_repository.qwen3vl_runtime.vision_inputs import vision_position_inputs


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint, tmp_path_factory):
    from builder.decoder_export import write_vision
    from model_repository.qwen3vl_runtime.decoder_weights import load_vision_tower

    folder = tmp_path_factory.mktemp("vision")
    write_vision(tiny_checkpoint, folder, quantization="none", dtype="float32")
    return ImageEncoder(load_vision_tower(folder, "cpu"), checkpoint_pixel_table(tiny_checkpoint))


def image(encoder: ImageEncoder, grid: tuple[int, int, int], seed: int) -> ImageInputs:
    visual = encoder.visual
    arrays = vision_position_inputs(np.array([grid]), num_grid_per_side=visual.num_grid_per_side, spatial_merge_size=2)
    arrays["pixel_bytes"] = np.random.default_rng(seed).integers(0, 256, (int(np.prod(grid)), encoder.patch_width), dtype=np.uint8)
    return ImageInputs.from_arrays(arrays)


def test_patch_rows_of_another_width_are_refused(encoder):
    """The decoder's intake check: rows of the wrong width get a ValueError naming them (served as
    the request's error), not a failed engine step for every prompt prefilled with them."""
    good = image(encoder, (1, 4, 4), seed=0)
    encoder.check(good)
    wrong = ImageInputs(good.pixel_bytes[:, :-1].contiguous(), *(getattr(good, f) for f in ("pos_interp_indices", "pos_interp_weights", "rotary_pos_ids")), lengths=good.lengths)  # fmt: skip
    with pytest.raises(ValueError, match=f"uint8 rows of {encoder.patch_width} bytes"):
        encoder.check(wrong)


def assert_same(got, want):
    """Equal up to float32 rounding: padding changes the products' shapes, and with them the
    order of the sums (the tiny tower amplifies that to ~2e-5 in a few elements)."""
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert float((g - w).norm() / w.norm()) < 1e-6


def test_mixed_sizes_come_back_in_order(encoder):
    """Three sizes interleaved (one with two frames), one size thrice (a bucket of 4, one padding
    image), against one eager call."""
    grids = [(1, 4, 6), (1, 2, 2), (1, 4, 6), (2, 2, 4), (1, 4, 6)]
    images = [image(encoder, g, seed) for seed, g in enumerate(grids)]
    tower = GraphedTower(encoder.visual, encoder.pixel_values, encoder.encode_eager, capture=False)
    assert_same(tower(images), encoder.encode_eager(images))
    assert sorted(tower.graphs) == [((4,), 1), ((8, 8), 1), ((24,), 4)]
    # A bucket's padding holds an earlier call's images: later calls must not see them.
    assert_same(tower(images[:1]), encoder.encode_eager(images[:1]))


def test_chunks_past_the_largest_bucket_and_eager_past_the_limits(encoder, monkeypatch):
    images = [image(encoder, (1, 4, 6), seed) for seed in range(5)] + [image(encoder, (1, 4, 4), 9)]
    monkeypatch.setattr(vision_graphs, "MAX_PATCHES", 48)  # two 24-patch images per graph at most
    monkeypatch.setattr(vision_graphs, "MAX_GRAPHS", 2)
    tower = GraphedTower(encoder.visual, encoder.pixel_values, encoder.encode_eager, capture=False)
    assert_same(tower(images), encoder.encode_eager(images))
    # Chunks of 2, 2 and 1 images of 24 patches; the 16-patch image came third: eager.
    assert sorted(tower.graphs) == [((24,), 1), ((24,), 2)]
    monkeypatch.setattr(vision_graphs, "MAX_PATCHES", 16)
    big = [image(encoder, (1, 4, 6), 11)]  # over MAX_PATCHES: eager, no graph
    assert_same(GraphedTower(encoder.visual, encoder.pixel_values, encoder.encode_eager, capture=False)(big), encoder.encode_eager(big))
