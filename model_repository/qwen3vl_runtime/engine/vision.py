"""The vision tower inside the decoder's process (``--vision-backend decoder``).

The images of every prompt prefilled in one engine step are encoded in one call: their patches
laid end to end, images of one size attended as one batch. No second CUDA context, no copy of
the embeddings between processes, and images batch across requests, which Triton's ensemble
cannot do for a separate vision model (docs/triton_findings.md).

Images arrive as their bytes in patch order (``pixel_bytes``); the image processor's per-channel
map to floats (``patches.pixel_table``) is applied here, on the device: the same floats as the
processor's, an eighth of the bytes through Triton's tensors and onto the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..host_to_device import to_device
from ..segment_attention import SegmentAttention
from ..vision_inputs import (
    CU_SEQLENS,
    PIXEL_BYTES,
    POS_INTERP_INDICES,
    POS_INTERP_WEIGHTS,
    ROTARY_POS_IDS,
    check_vision_inputs,
    vision_position_inputs,
)
from ..vision_tower import encode_images, rotate_qk
from .metrics import Captures


@dataclass(frozen=True)
class ImageInputs:
    """One request's images as the preprocess model sends them (host tensors)."""

    pixel_bytes: torch.Tensor  # [N, C*P*P] uint8, one frame
    pos_interp_indices: torch.Tensor  # [N, 4] int64
    pos_interp_weights: torch.Tensor  # [N, 4] float32
    rotary_pos_ids: torch.Tensor  # [N, 2] int64
    lengths: tuple[int, ...]  # patches per attention segment (image frame), from cu_seqlens

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "ImageInputs":
        """From the five vision tensors by name; ValueError if they disagree."""
        check_vision_inputs(arrays)
        tensors = [torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in (PIXEL_BYTES, POS_INTERP_INDICES, POS_INTERP_WEIGHTS, ROTARY_POS_IDS)]  # fmt: skip
        return cls(*tensors, lengths=tuple(np.diff(arrays[CU_SEQLENS]).tolist()))

    @property
    def patches(self) -> int:
        return self.pixel_bytes.shape[0]


def patch_bytes_width(visual: nn.Module) -> int:
    """Bytes in one patch row of ``pixel_bytes`` (C*P*P: one frame of the patch embedding's input)."""
    return visual.patch_embed.proj.weight[0].numel() // visual.patch_embed.temporal_patch_size


class PixelValues:
    """Patch bytes [N, C*P*P] uint8 -> the processor's pixel rows [N, C*T*P*P] in ``dtype``: each
    byte looked up in its channel's row of ``table`` [C, 256] (``patches.pixel_table``), the frame
    repeated over the patch's T time steps. The table is cast to ``dtype`` once: casting after
    the lookup gives the same values."""

    def __init__(self, table: np.ndarray, temporal: int, device: torch.device, dtype: torch.dtype):
        channels = table.shape[0]
        self.table = torch.from_numpy(np.ascontiguousarray(table)).to(device, dtype).flatten()  # [C * 256]
        self.offsets = (torch.arange(channels, device=device) * 256)[None, :, None]  # [1, C, 1]
        self.channels, self.temporal = channels, temporal

    def __call__(self, patch_bytes: torch.Tensor) -> torch.Tensor:
        n = patch_bytes.shape[0]
        values = self.table[patch_bytes.view(n, self.channels, -1).long() + self.offsets]  # [N, C, P*P]
        return values[:, :, None].expand(-1, -1, self.temporal, -1).reshape(n, -1)


class ImageEncoder:
    """Runs ``visual`` (transformers' ``Qwen3VLVisionModel``, loaded by ``load_vision_tower``) on
    patch bytes, with ``pixel_table`` [C, 256] the image processor's map of each channel's bytes
    (``patches.pixel_table``).

    cuda_graphs: on CUDA, replay the tower from CUDA graphs per image size (``vision_graphs``):
    ``graphs``, None on the CPU (where tests set a ``GraphedTower(capture=False)`` to run the
    buckets' logic). graph_grids: patch grids (t, h, w) whose every bucket ``warm_up`` captures
    before serving (build-repo --vision-graph-sizes)."""

    def __init__(self, visual: nn.Module, pixel_table: np.ndarray, *, cuda_graphs: bool = True, graph_grids: tuple[tuple[int, int, int], ...] = ()):  # fmt: skip
        self.visual = visual
        proj = visual.patch_embed.proj
        self.device = proj.weight.device
        self.pixel_values = PixelValues(pixel_table, visual.patch_embed.temporal_patch_size, self.device, proj.weight.dtype)
        self.patch_width = patch_bytes_width(visual)
        self.merge_unit = visual.spatial_merge_size**2  # patches per image token
        self.graph_grids = tuple(graph_grids)
        self.rotate = rotate_qk
        self.graphs = None
        if self.device.type == "cuda":
            from ..kernels.vision_rope import vision_rope

            self.rotate = vision_rope
            if cuda_graphs:
                from .vision_graphs import GraphedTower

                self.graphs = GraphedTower(visual, self.pixel_values, self.encode_eager, self.rotate)

    @property
    def captures(self) -> Captures:
        return self.graphs.captures if self.graphs is not None else Captures()

    def check(self, images: ImageInputs) -> None:
        """Raise ValueError unless the patch rows are this tower's width: a wrong width would fail
        the whole engine step that encodes them, and every prompt prefilled with them."""
        width = images.pixel_bytes.shape[1]
        if images.pixel_bytes.dtype != torch.uint8 or width != self.patch_width:
            raise ValueError(f"pixel_bytes must be uint8 rows of {self.patch_width} bytes, got {images.pixel_bytes.dtype} rows of {width}")

    @torch.inference_mode()
    def __call__(self, images: list[ImageInputs]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_embeds [tokens, hidden], deepstack [layers, tokens, hidden]) of all ``images``,
        in order, on the tower's device."""
        return self.graphs(images) if self.graphs is not None else self.encode_eager(images)

    @torch.inference_mode()
    def encode_eager(self, images: list[ImageInputs]) -> tuple[torch.Tensor, torch.Tensor]:
        """``__call__`` without CUDA graphs."""
        patch_bytes, indices, weights, rotary = (
            to_device([getattr(i, name) for i in images], self.device)
            for name in ("pixel_bytes", "pos_interp_indices", "pos_interp_weights", "rotary_pos_ids")
        )
        attend = SegmentAttention([n for i in images for n in i.lengths], self.device)
        return encode_images(self.visual, self.pixel_values(patch_bytes), indices, weights, rotary, attend, self.rotate)

    def warm_up(self, grids=((1, 16, 16), (1, 4, 8), (1, 2, 2))) -> dict[tuple[int, int, int], list[int]]:
        """Encode blank images of a few sizes, eagerly: the GPU kernels pick their tile sizes
        (Triton autotuning) here rather than in the first requests' time to first token (no graph
        slot goes to sizes no client may send). Then capture every bucket of ``graph_grids`` ->
        the buckets captured per grid (none without graphs)."""
        visual = self.visual
        side = visual.num_grid_per_side
        for grid in grids:
            arrays = vision_position_inputs(np.array([grid]), num_grid_per_side=side, spatial_merge_size=visual.spatial_merge_size)
            arrays[PIXEL_BYTES] = np.zeros((int(np.prod(grid)), self.patch_width), np.uint8)
            self.encode_eager([ImageInputs.from_arrays(arrays)])
        if self.graphs is None:
            return {}
        return {grid: self.graphs.prepare((grid[1] * grid[2],) * grid[0]) for grid in self.graph_grids}
