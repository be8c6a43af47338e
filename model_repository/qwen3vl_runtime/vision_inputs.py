"""Host-side inputs of the vision encoder, computed from each image's patch grid.

The vision tower's data-dependent steps (resampling the learned position table to each grid, the
2-D rotary ids, the per-image attention boundaries) are computed here so that the exported ONNX
graph has static control flow. Values equal transformers' ``vision_utils`` helpers used by
``Qwen3VLVisionModel.forward`` (bilinear, ``align_corners=True``, spatial-merge-block order).

NumPy only: this runs in the CPU preprocessing model, which has no torch.
"""

from __future__ import annotations

import numpy as np

from . import specs

PIXEL_VALUES, PIXEL_BYTES = specs.PIXEL_VALUES.name, specs.PIXEL_BYTES.name
POS_INTERP_INDICES, POS_INTERP_WEIGHTS, ROTARY_POS_IDS, CU_SEQLENS = (spec.name for spec in specs.PATCH_POSITIONS)


def vision_position_inputs(
    grid_thw: np.ndarray, *, num_grid_per_side: int, spatial_merge_size: int
) -> dict[str, np.ndarray]:
    """The four position inputs of the vision encoder for images with patch grids ``grid_thw``.

    grid_thw: [images, 3] (temporal, height, width) in patches, as the image processor returns it.
    Returns ``pos_interp_indices`` [N, 4] int64, ``pos_interp_weights`` [N, 4] float32,
    ``rotary_pos_ids`` [N, 2] int64 and ``cu_seqlens`` [segments + 1] int32, where N is the total
    patch count in the processor's patch order and each frame is its own attention segment.
    """
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    merge = int(spatial_merge_size)
    if len(grid) == 0 or (grid <= 0).any() or (grid[:, 1:] % merge).any():
        raise ValueError(f"grid_thw must be non-empty, positive, h and w multiples of {merge}: {grid.tolist()}")
    rows, cols = _patch_rows_cols(grid, merge)  # [N] each
    heights = np.repeat(grid[:, 1], grid.prod(axis=1))  # [N] grid height of each patch's image
    widths = np.repeat(grid[:, 2], grid.prod(axis=1))  # [N]
    side = int(num_grid_per_side)
    h_taps, h_weights = _bilinear_taps(rows, heights, side)  # [N, 2] each
    w_taps, w_weights = _bilinear_taps(cols, widths, side)  # [N, 2] each
    # Separable 2-D: outer product of the per-axis taps -> 4 taps per patch, (h, w) row-major.
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    frame_lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])  # [segments]
    cu_seqlens = np.concatenate([[0], np.cumsum(frame_lengths)]).astype(np.int32)
    return {
        POS_INTERP_INDICES: indices.astype(np.int64),
        POS_INTERP_WEIGHTS: weights.astype(np.float32),
        ROTARY_POS_IDS: np.stack([rows, cols], axis=-1).astype(np.int64),
        CU_SEQLENS: cu_seqlens,
    }


def check_vision_inputs(inputs: dict[str, np.ndarray]) -> None:
    """Raise ValueError unless the five encoder inputs (the pixels as ``pixel_values`` or
    ``pixel_bytes``) agree on the patch count and boundaries.

    The encoder's block-diagonal attention trusts ``cu_seqlens``; inconsistent inputs would give
    wrong embeddings rather than an error, so a server checks them before running the graph.
    """
    shapes = {name: np.shape(value) for name, value in inputs.items()}
    pixels = shapes.get(PIXEL_BYTES, shapes.get(PIXEL_VALUES, ()))
    n = pixels[0] if len(pixels) == 2 else None
    expected = {POS_INTERP_INDICES: (n, 4), POS_INTERP_WEIGHTS: (n, 4), ROTARY_POS_IDS: (n, 2)}
    if n is None or n == 0 or any(shapes[name] != shape for name, shape in expected.items()):
        raise ValueError(f"vision inputs disagree on the patch count: shapes {shapes}")
    cu = np.asarray(inputs[CU_SEQLENS])
    if cu.ndim != 1 or cu.size < 2 or cu[0] != 0 or cu[-1] != n or (np.diff(cu) <= 0).any():
        raise ValueError(f"cu_seqlens must rise from 0 to the patch count {n}: got {cu.tolist()}")


def _patch_rows_cols(grid: np.ndarray, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of every patch in the processor's order: merge x merge blocks, row-major inside
    and across blocks, each frame repeated t times."""
    rows, cols = [], []
    for t, h, w in grid.tolist():
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # [h, w] each
        block = (h // merge, merge, w // merge, merge)
        rows.append(np.tile(r.reshape(block).transpose(0, 2, 1, 3).ravel(), t))
        cols.append(np.tile(c.reshape(block).transpose(0, 2, 1, 3).ravel(), t))
    return np.concatenate(rows), np.concatenate(cols)


def _bilinear_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two taps into a ``side``-long table and their weights for positions ``index`` on axes of
    length ``size`` (align_corners=True). Float32 in the same operation order as transformers, so
    the weights match it bit for bit."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)  # [N]
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)  # [N, 2]
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))  # [N, 2]
    return taps, np.maximum(np.float32(1) - distance, np.float32(0))
