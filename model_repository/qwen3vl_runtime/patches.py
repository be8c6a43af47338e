"""Images to the vision tower's patch rows: the Hugging Face image processor's output, bit for bit,
in a third of its time.

The processor (PIL backend) resizes, rescales to float64, casts to float32, normalises per channel
and reorders into patches, each step a pass over the whole image in channels-first order. Every
arithmetic step maps one uint8 value of one channel to one float32, so here that map is computed
once, by the processor's own ``rescale`` and ``normalize`` on the 256 values of each channel, and
each image becomes one table lookup into its final patch order.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

CHANNELS = 3


class PatchMaker:
    """``make(images)`` -> (pixel_values [patches, C*T*P*P] float32, grid_thw [images, 3] int64),
    equal to ``processor(images=images, return_tensors="np")`` for RGB PIL images."""

    def __init__(self, processor, *, min_pixels: int, max_pixels: int):
        self.patch, self.merge = processor.patch_size, processor.merge_size
        self.temporal = processor.temporal_patch_size
        self.resample = processor.resample
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        values = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (CHANNELS, 256, 1))  # a [C, 256, 1] "image"
        if processor.do_rescale:
            values = processor.rescale(values, processor.rescale_factor)
        if processor.do_normalize:
            values = processor.normalize(values, processor.image_mean, processor.image_std)
        # [c, v]: channel c's uint8 value v after the processor's arithmetic.
        self.table = np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(CHANNELS, 256))

    def make(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Raises ValueError (from ``smart_resize``) for an aspect ratio the processor refuses."""
        rows, grids = [], []
        for image in images:
            patches, grid_h, grid_w = self._patches(image)
            rows.append(patches)
            grids.append([1, grid_h, grid_w])
        return np.concatenate(rows), np.array(grids, dtype=np.int64)

    def _patches(self, image: Image.Image) -> tuple[np.ndarray, int, int]:
        factor = self.patch * self.merge
        height, width = smart_resize(image.height, image.width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)  # fmt: skip
        if (width, height) != image.size:
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)  # [H, W, C] uint8
        p, m = self.patch, self.merge
        grid_h, grid_w = height // p, width // p
        # The processor's patch order: merge blocks row-major, patches inside a block, then
        # channel, time (the frame repeated), patch row, patch column. Reordered as bytes first
        # (a quarter of the floats' size), then one lookup per channel (np.take with uint8
        # indices: several times faster than one fancy index over all channels).
        blocks = np.ascontiguousarray(pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, CHANNELS).transpose(0, 3, 1, 4, 6, 2, 5))  # fmt: skip
        out = np.empty((*blocks.shape[:5], self.temporal, p, p), np.float32)  # [gh/m, gw/m, m, m, C, T, p, p]
        for channel in range(CHANNELS):
            out[:, :, :, :, channel] = np.take(self.table[channel], blocks[:, :, :, :, channel])[:, :, :, :, None]
        return out.reshape(grid_h * grid_w, -1), grid_h, grid_w
