"""mrope_positions (numpy) against transformers' Qwen3VLModel.get_rope_index on real prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from builder.checkpoint import demo_config, write_processor_files
from model_repository.qwen3vl_runtime.rope import mrope_positions

IMAGE_PAD = "<|image_pad|>"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tokenizer, image processor and a tiny HF model (get_rope_index reads only its config)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLModel

    files = tmp_path_factory.mktemp("processor")
    write_processor_files(files)
    config = demo_config()
    with torch.device("meta"):  # no weights needed
        model = Qwen3VLModel(config)
    return {
        "tokenizer": AutoTokenizer.from_pretrained(files),
        "image_processor": AutoImageProcessor.from_pretrained(files, backend="pil"),
        "model": model,
        "config": config,
    }


def random_image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def prompt_ids(env, messages: list[dict], images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """input_ids [L] and image_grid_thw [images, 3], as Qwen3VLProcessor builds them."""
    tokenizer, image_processor = env["tokenizer"], env["image_processor"]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if images:
        grids = np.asarray(image_processor(images=images, return_tensors="np")["image_grid_thw"], dtype=np.int64)
    else:
        grids = np.zeros((0, 3), dtype=np.int64)
    # Qwen3VLProcessor.replace_image_token: one pad token per merged block of merge_size**2 patches.
    pieces = text.split(IMAGE_PAD)
    assert len(pieces) == len(grids) + 1
    merge = image_processor.merge_size
    text = pieces[0] + "".join(IMAGE_PAD * int(g.prod() // merge**2) + p for g, p in zip(grids, pieces[1:]))
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    return ids, grids


def ours(env, ids: np.ndarray, grids: np.ndarray) -> tuple[np.ndarray, int]:
    config = env["config"]
    return mrope_positions(
        ids,
        grids,
        spatial_merge_size=config.vision_config.spatial_merge_size,
        image_token_id=config.image_token_id,
        vision_start_token_id=config.vision_start_token_id,
    )


def hf(env, ids: np.ndarray, grids: np.ndarray) -> tuple[np.ndarray, int]:
    input_ids = torch.from_numpy(ids)[None]  # [1, L]
    mm_token_type_ids = (input_ids == env["config"].image_token_id).int()  # what the processor returns
    positions, deltas = env["model"].get_rope_index(
        input_ids,
        mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=torch.from_numpy(grids) if len(grids) else None,
    )
    return positions[:, 0].numpy(), int(deltas[0, 0])  # [3, L], scalar


def user(text: str, n_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


CASES = {
    "text_only": ([user("Write a haiku about the sea.")], []),
    "one_image": ([user("What is in this picture?", 1)], [(120, 200)]),
    "two_images_different_sizes": ([user("Compare these two.", 2)], [(100, 150), (420, 260)]),
    "multi_turn_image_first": (
        [user("Describe the image.", 1), assistant("A noisy square."), user("What colour dominates?")],
        [(300, 300)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf_get_rope_index(env, case):
    messages, sizes = CASES[case]
    images = [random_image(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    ids, grids = prompt_ids(env, messages, images)
    if case == "two_images_different_sizes":
        assert not np.array_equal(grids[0], grids[1])

    positions, delta = ours(env, ids, grids)
    want_positions, want_delta = hf(env, ids, grids)

    assert positions.dtype == np.int64 and positions.shape == (3, len(ids))
    np.testing.assert_array_equal(positions, want_positions)
    assert delta == want_delta
    if images:
        assert delta < 0  # an image takes fewer positions than tokens


def test_text_after_image_resumes_at_max_plus_one(env):
    ids, grids = prompt_ids(env, [user("Hi", 1)], [random_image(64, 200, 0)])
    positions, _ = ours(env, ids, grids)
    last_image = np.flatnonzero(ids == env["config"].image_token_id)[-1]
    assert (positions[:, last_image + 1] == positions[:, : last_image + 1].max() + 1).all()


def test_pad_count_mismatch_raises(env):
    ids, grids = prompt_ids(env, [user("What is this?", 1)], [random_image(100, 100, 0)])
    image_token_id = env["config"].image_token_id
    one_pad_less = np.delete(ids, np.flatnonzero(ids == image_token_id)[0])
    with pytest.raises(ValueError, match="do not match the image grids"):
        ours(env, one_pad_less, grids)
    with pytest.raises(ValueError, match="do not match the image grids"):
        ours(env, ids, np.concatenate([grids, grids]))  # a grid with no tokens
    with pytest.raises(ValueError, match="do not match the image grids"):
        ours(env, ids, np.zeros((0, 3), dtype=np.int64))  # tokens with no grid


def test_pad_without_vision_start_raises(env):
    ids, grids = prompt_ids(env, [user("What is this?", 1)], [random_image(100, 100, 0)])
    ids[ids == env["config"].vision_start_token_id] = env["tokenizer"].convert_tokens_to_ids("a")
    with pytest.raises(ValueError, match="vision_start"):
        ours(env, ids, grids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_table_gives_forward_values_exactly(dtype):
    """The decode step's rotary lookup (one gather) returns the bits the computed cos/sin have."""
    from model_repository.qwen3vl_runtime.text_model import MRoPE, TextConfig

    rope = MRoPE(TextConfig.from_hf(demo_config().to_dict()))
    positions = torch.tensor([0, 1, 7, 250, 1023, 5])
    computed = rope(positions, dtype)
    rope.prepare_decode(1024, "cpu", dtype)
    rope.prepare_decode(16, "cpu", dtype)  # a second runner with a shorter context keeps the longer table
    assert all(torch.equal(a, b) for a, b in zip(rope.decode(positions, dtype), computed))
    assert all(torch.equal(a, b) for a, b in zip(rope.decode(positions, torch.float16), rope(positions, torch.float16)))


@pytest.mark.parametrize("case", [*CASES, "wide_image"])
def test_mrope_positions_never_run_ahead_of_the_tokens(env, case):
    """1 - prompt tokens <= rope_delta <= 0: what the engine accepts (its rotary table for decode
    covers the positions below the context length)."""
    messages, sizes = CASES.get(case, ([user("Read this strip.", 1)], [(64, 2048)]))
    ids, grids = prompt_ids(env, messages, [random_image(h, w, i) for i, (h, w) in enumerate(sizes)])
    _, delta = ours(env, ids, grids)
    assert 1 - len(ids) <= delta <= 0
