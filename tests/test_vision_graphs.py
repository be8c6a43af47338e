"""The vision tower's graph buckets: grouping by image size, padding, chunking and reassembly, and
the captures made before serving (``prepare``) and while serving (counted by the engine).

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


def test_prepare_captures_every_bucket_of_a_size_and_only_first_sights_count(encoder, monkeypatch):
    """build-repo --vision-graph-sizes: ``prepare`` makes each bucket a size fits (largest first,
    within MAX_GRAPHS) before serving, so serving that size captures nothing; a size first seen
    while serving is counted (on the GPU each such call stalls every stream)."""
    monkeypatch.setattr(vision_graphs, "MAX_PATCHES", 96)  # 24-patch images: buckets of 1, 2 and 4
    tower = GraphedTower(encoder.visual, encoder.pixel_values, encoder.encode_eager, capture=False)
    assert tower.prepare((24,)) == [1, 2, 4] and tower.prepare((24,)) == []
    three = [image(encoder, (1, 4, 6), seed) for seed in range(3)]
    assert_same(tower(three), encoder.encode_eager(three))
    assert tower.captures == vision_graphs.Captures() and len(tower.graphs) == 3
    other = [image(encoder, (1, 4, 4), 7)]
    assert_same(tower(other), encoder.encode_eager(other))
    assert tower.captures.count == 1 and tower.captures.seconds > 0
    monkeypatch.setattr(vision_graphs, "MAX_GRAPHS", 2)
    assert GraphedTower(encoder.visual, encoder.pixel_values, encoder.encode_eager, capture=False).prepare((24,)) == [2, 4]


def test_engine_counts_and_logs_the_vision_graphs_its_prefills_capture(tiny_checkpoint, encoder, tmp_path):
    """Two requests with a 64x64 image (a size prepared at start), then one with a 96x64 image
    (first seen while serving): the engine's totals and step log hold that one capture and its
    time, in the step that prefilled it. The buckets run eagerly here (``capture=False``); on the
    GPU the same calls capture CUDA graphs."""
    import io
    import json

    import torch
    from PIL import Image
    from transformers import AutoTokenizer

    from builder.decoder_export import write_decoder
    from model_repository.qwen3vl_runtime.decoder_weights import load_text_model
    from model_repository.qwen3vl_runtime.engine import Engine, SamplingParams, Sequence
    from model_repository.qwen3vl_runtime.engine.runner import ModelRunner, PromptInputs
    from model_repository.qwen3vl_runtime.engine.step_log import StepLog
    from model_repository.qwen3vl_runtime.patches import patch_grid
    from model_repository.qwen3vl_runtime.preprocessing import PreprocessLimits, Preprocessor

    write_decoder(tiny_checkpoint, tmp_path / "decoder", quantization="none", dtype="float32")
    limits = PreprocessLimits(max_context=256, max_pixels=64 * 96, min_pixels=32 * 32, max_images=1, max_source_pixels=10**6)
    pre = Preprocessor(tiny_checkpoint, limits, pixel_bytes=True)
    grid = patch_grid(64, 64, patch=16, merge=2, min_pixels=limits.min_pixels, max_pixels=limits.max_pixels)
    assert grid == (1, 4, 4)
    vision = ImageEncoder(encoder.visual, checkpoint_pixel_table(tiny_checkpoint))
    vision.graphs = GraphedTower(vision.visual, vision.pixel_values, vision.encode_eager, capture=False)
    vision.graphs.prepare((grid[1] * grid[2],))
    runner = ModelRunner(load_text_model(tmp_path / "decoder"), num_slots=2, max_len=256, image_token_id=151655, vision=vision)
    log = tmp_path / "steps.jsonl"
    engine = Engine(runner, AutoTokenizer.from_pretrained(tiny_checkpoint), eos_token_ids=set(), num_slots=2, step_log=StepLog(log))
    done = []

    def submit(i: int, width: int, height: int):
        png = io.BytesIO()
        Image.new("RGB", (width, height), (i * 40, 90, 200)).save(png, format="PNG")
        inputs = pre("What is this?", [png.getvalue()])
        prompt = PromptInputs(torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["position_ids"]), images=ImageInputs.from_arrays(inputs))
        params = SamplingParams(max_tokens=2, ignore_eos=True)
        engine.submit(Sequence(str(i), prompt, len(inputs["input_ids"]), int(inputs["rope_delta"][0]), params, lambda out: done.append(out) if out.finish_reason else None))  # fmt: skip

    submit(0, 64, 64)
    submit(1, 64, 64)
    while len(done) < 2:
        engine.step()
    assert engine.metrics.step_totals().vision_captures.count == 0
    submit(2, 96, 64)
    while len(done) < 3:
        engine.step()
    engine.step_log.close()
    totals = engine.metrics.step_totals()
    assert not any(out.error for out in done)
    assert totals.vision_captures.count == 1 and totals.vision_captures.seconds > 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    captured = [line for line in lines if "captured_ms" in line]
    assert len(captured) == 1 and captured[0]["prefilled"] == 1
    assert 0 < captured[0]["captured_ms"] <= captured[0]["ms"]["prefill"] + 0.01
    assert abs(captured[0]["captured_ms"] - totals.vision_captures.seconds * 1e3) < 0.01
