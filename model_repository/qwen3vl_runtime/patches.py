"""Images to the vision tower's patch rows: the Hugging Face image processor's output, bit for bit,
in a fraction of its time and size.

The processor (PIL backend) resizes, rescales to float64, casts to float32, normalises per channel
and reorders into patches, each step a pass over the whole image in channels-first order. Every
arithmetic step maps one uint8 value of one channel to one float32, so here that map is computed
once (``pixel_table``: the processor's own ``rescale`` and ``normalize`` on the 256 values of each
channel), and an image becomes its bytes reordered into patches. The float rows are one lookup
in that table away, with the frame repeated over the patch's time steps: done here for the ONNX
vision encoder (``PatchMaker.pixel_values``), on the GPU by the decoder when it runs the tower
(``engine.vision``), which so receives an eighth of the bytes (a 448 px image: 0.6 MB, not 4.8).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

CHANNELS = 3


def pixel_table(processor) -> np.ndarray:
    """[C, 256] float32: row c, column v is channel c's uint8 value v after the image processor's
    rescale and normalisation (the processor's own methods, so its float64 steps and casts)."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (CHANNELS, 256, 1))  # a [C, 256, 1] "image"
    if processor.do_rescale:
        values = processor.rescale(values, processor.rescale_factor)
    if processor.do_normalize:
        values = processor.normalize(values, processor.image_mean, processor.image_std)
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(CHANNELS, 256))


def checkpoint_pixel_table(folder) -> np.ndarray:
    """``pixel_table`` of the image processor in ``folder`` (its preprocessor_config.json)."""
    from transformers import AutoImageProcessor

    return pixel_table(AutoImageProcessor.from_pretrained(folder, backend="pil"))


def parse_image_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """"448x448,1280x720" -> ((448, 448), (1280, 720)) (width x height); "" -> (); ValueError
    naming the entry that is not two positive integers."""
    sizes = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        width, sep, height = entry.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
            raise ValueError(f"{entry!r} is not an image size WIDTHxHEIGHT in pixels (e.g. 448x448)")
        sizes.append((int(width), int(height)))
    return tuple(sizes)


def patch_grid(width: int, height: int, *, patch: int, merge: int, min_pixels: int, max_pixels: int) -> tuple[int, int, int]:
    """(1, rows, columns) of patches of a width x height image after the processor's resize (``PatchMaker``'s)."""
    resized_h, resized_w = smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    return (1, resized_h // patch, resized_w // patch)


class PatchMaker:
    """``make(images)`` -> (patch bytes [patches, C*P*P] uint8, grid_thw [images, 3] int64);
    ``pixel_values(patch bytes)`` [patches, C*T*P*P] float32 and that grid equal
    ``processor(images=images, return_tensors="np")`` for RGB PIL images."""

    def __init__(self, processor, *, min_pixels: int, max_pixels: int):
        self.patch, self.merge = processor.patch_size, processor.merge_size
        self.temporal = processor.temporal_patch_size
        self.resample = processor.resample
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.table = pixel_table(processor)

    def make(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Raises ValueError (from ``smart_resize``) for an aspect ratio the processor refuses."""
        rows, grids = [], []
        for image in images:
            patches, grid_h, grid_w = self._patches(image)
            rows.append(patches)
            grids.append([1, grid_h, grid_w])
        return np.concatenate(rows), np.array(grids, dtype=np.int64)

    def _patches(self, image: Image.Image) -> tuple[np.ndarray, int, int]:
        p, m = self.patch, self.merge
        _, grid_h, grid_w = patch_grid(image.width, image.height, patch=p, merge=m, min_pixels=self.min_pixels, max_pixels=self.max_pixels)  # fmt: skip
        height, width = grid_h * p, grid_w * p
        if (width, height) != image.size:
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)  # [H, W, C] uint8
        # The processor's patch order: merge blocks row-major, patches inside a block, then
        # channel, patch row, patch column (the time steps, the frame repeated, come with the
        # floats).
        blocks = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, CHANNELS).transpose(0, 3, 1, 4, 6, 2, 5)
        return np.ascontiguousarray(blocks).reshape(grid_h * grid_w, -1), grid_h, grid_w

    def pixel_values(self, patch_bytes: np.ndarray) -> np.ndarray:
        """[patches, C*T*P*P] float32 of ``make``'s bytes: one lookup per channel (np.take with
        uint8 indices: several times faster than one fancy index over all channels)."""
        by_channel = patch_bytes.reshape(len(patch_bytes), CHANNELS, -1)  # [N, C, P*P]
        out = np.empty((len(patch_bytes), CHANNELS, self.temporal, by_channel.shape[-1]), np.float32)
        for channel in range(CHANNELS):
            out[:, channel] = np.take(self.table[channel], by_channel[:, channel])[:, None]
        return out.reshape(len(patch_bytes), -1)
