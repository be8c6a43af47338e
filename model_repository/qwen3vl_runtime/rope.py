"""M-RoPE position ids of a Qwen3-VL prompt, in numpy (the preprocess model runs without torch).

Qwen3-VL rotates each query/key by three position axes (temporal, height, width). Text tokens
carry the same position on all three; the tokens of an image carry their (t, h, w) cell in the
merged patch grid, offset by the position where the image starts. After the prompt every token
is text again, so decoding needs only a 1-D position plus ``rope_delta``.
"""

from __future__ import annotations

import numpy as np


def mrope_positions(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray,
    *,
    spatial_merge_size: int,
    image_token_id: int,
    vision_start_token_id: int,
) -> tuple[np.ndarray, int]:
    """3-D positions of one unpadded prompt, as ``Qwen3VLModel.get_rope_index`` gives them.

    Args:
        input_ids: [L] int64, with each image already expanded to its ``<|image_pad|>`` tokens
            (``t * h * w // spatial_merge_size**2`` of them), each run right after a
            ``<|vision_start|>`` token, as the chat template and processor write them.
        image_grid_thw: [images, 3] int64, the (t, h, w) patch grid of each image, in prompt order.

    Returns:
        positions: [3, L] int64 (t, h, w axes).
        rope_delta: ``positions.max() + 1 - L``; decode step ``i`` (0-based, after the prompt)
            sits at position ``L + i + rope_delta`` on all three axes.

    Raises:
        ValueError: the image-pad runs do not match the grids (count, length or missing
            ``<|vision_start|>``), or the prompt is empty.
    """
    input_ids = np.asarray(input_ids).reshape(-1)  # [L]
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)  # [images, 3]
    length = input_ids.shape[0]
    if length == 0:
        raise ValueError("mrope_positions: empty prompt")
    spans = _image_spans(input_ids, image_token_id)
    _check_spans(input_ids, spans, grids, spatial_merge_size, vision_start_token_id)

    positions = np.empty((3, length), dtype=np.int64)  # [3, L]
    next_pos = 0  # position of the next text token
    cursor = 0  # first token not yet placed
    for (start, end), (t, h, w) in zip(spans, grids):
        positions[:, cursor:start] = next_pos + np.arange(start - cursor)  # text: same on 3 axes
        next_pos += start - cursor
        grid_h, grid_w = h // spatial_merge_size, w // spatial_merge_size
        # Tokens run t-major, then rows, then columns (the vision tower's merge order).
        positions[0, start:end] = next_pos + np.repeat(np.arange(t), grid_h * grid_w)
        positions[1, start:end] = next_pos + np.tile(np.repeat(np.arange(grid_h), grid_w), t)
        positions[2, start:end] = next_pos + np.tile(np.arange(grid_w), t * grid_h)
        # HF advances by the larger spatial side only (t is 1 for images): max position + 1.
        next_pos += max(grid_h, grid_w)
        cursor = end
    positions[:, cursor:] = next_pos + np.arange(length - cursor)
    rope_delta = int(positions.max()) + 1 - length
    return positions, rope_delta


def _image_spans(input_ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of every run of consecutive image-pad tokens."""
    is_image = (input_ids == image_token_id).astype(np.int8)  # [L]
    edges = np.diff(np.concatenate(([0], is_image, [0])))  # [L + 1]: +1 at a start, -1 after an end
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


def _check_spans(
    input_ids: np.ndarray,
    spans: list[tuple[int, int]],
    grids: np.ndarray,
    spatial_merge_size: int,
    vision_start_token_id: int,
) -> None:
    """Each image-pad run must be one image: its own grid's token count, after <|vision_start|>."""
    expected = grids.prod(axis=1) // spatial_merge_size**2  # [images]
    found = [end - start for start, end in spans]
    if len(found) != len(expected) or any(n != e for n, e in zip(found, expected)):
        raise ValueError(
            f"image-pad tokens do not match the image grids: runs of {found} tokens in the prompt, "
            f"but grids {grids.tolist()} need {expected.tolist()} "
            f"(t*h*w // {spatial_merge_size}**2 per image)"
        )
    for start, _ in spans:
        if start == 0 or input_ids[start - 1] != vision_start_token_id:
            raise ValueError(f"image-pad tokens at position {start} do not follow a <|vision_start|> token")
