"""The vision tower replayed from CUDA graphs, one per (image size, images per call) bucket.

Eager, one call of the tower is hundreds of launches (24 blocks of norms, products, rotary and
attention): one 448 px image took 16-34 ms of wall time for a few ms of kernels, replayed 3.7-4.7 ms
(H200, run 9: scripts/profile_prefill.py, docs/benchmarks.md), in every first token and in every
engine step that prefills a newcomer.

A graph is captured the first time its image size arrives in that bucket's number (that call pays
two eager runs and the capture), for a bucket of images of that size; padding images are whatever
the static buffers hold (zeros or an earlier call's patches), attended only among themselves.
Past ``MAX_GRAPHS`` graphs, and for images of more than ``MAX_PATCHES`` patches, the tower runs eagerly.

A capture while serving stalls every stream: it synchronises the device, and the engine thread
launches nothing else meanwhile (a 3-prompt prefill's launch took 77.4 ms for it on the H200, run
20, docs/benchmarks.md). ``captures`` counts them and their seconds, for the engine's metrics and
step log; ``prepare`` captures every bucket of a size before serving (build-repo
--vision-graph-sizes), so that size never stalls.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import torch

from ..host_to_device import pinned_cat
from ..segment_attention import SegmentAttention
from ..vision_tower import Rotate, encode_images, rotate_qk
from .cuda_graphs import capture_buckets
from .metrics import Captures
from .vision import ImageInputs, PixelValues, patch_bytes_width

IMAGE_BUCKETS = (1, 2, 4, 8, 16)
# Patches per graph (bucket x patches per image): bounds the graphs' activation memory (at 8,192
# patches the MLP's [patches, 4096] bf16 intermediate is 64 MiB) and the padding a bucket wastes.
MAX_PATCHES = 8192
MAX_GRAPHS = 32

Encoded = tuple[torch.Tensor, torch.Tensor]  # (image_embeds [tokens, hidden], deepstack [layers, tokens, hidden])


class GraphedTower:
    """pixel_values: patch bytes -> the tower's pixel rows (``vision.PixelValues``, replayed with
    the tower); encode_eager(images) -> Encoded: the tower's eager call, for what no graph covers;
    rotate: the rotary embedding it runs (``encode_images``). capture=False runs each bucket's
    padded call eagerly instead of replaying it (the CPU tests of the grouping and padding; the
    graphs themselves need CUDA)."""

    def __init__(self, visual, pixel_values: PixelValues, encode_eager: Callable[[list[ImageInputs]], Encoded], rotate: Rotate = rotate_qk, *, capture: bool = True):  # fmt: skip
        self.visual, self.pixel_values, self.encode_eager = visual, pixel_values, encode_eager
        self.rotate, self.capture = rotate, capture
        self.merge_unit = visual.spatial_merge_size**2
        self.graphs: dict[tuple[tuple[int, ...], int], _BucketGraph] = {}
        self._pool = None  # one memory pool for every bucket: they never run at the same time
        self.captures = Captures()  # while serving; ``prepare``'s are not counted

    def prepare(self, lengths: tuple[int, ...]) -> list[int]:
        """Capture every bucket of images of this size (patches per frame) that has no graph yet,
        largest first (the others reuse its pool), within MAX_PATCHES and MAX_GRAPHS -> the buckets
        captured."""
        fitting = [b for b in IMAGE_BUCKETS if b * sum(lengths) <= MAX_PATCHES and (lengths, b) not in self.graphs]
        made = []
        for bucket in sorted(fitting, reverse=True):
            if len(self.graphs) >= MAX_GRAPHS:
                break
            self._capture(lengths, bucket)
            made.append(bucket)
        return sorted(made)

    def _capture(self, lengths: tuple[int, ...], bucket: int) -> "_BucketGraph":
        graph = _BucketGraph(self.visual, self.pixel_values, lengths, bucket, self.rotate, self.capture, self._pool)
        self.graphs[(lengths, bucket)] = graph
        self._pool = graph.pool
        return graph

    def __call__(self, images: list[ImageInputs]) -> Encoded:
        """Same contract as ``ImageEncoder.__call__``: every image's rows, in order."""
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            by_size[image.lengths].append(i)
        done: list[tuple[list[int], Encoded]] = []  # (image indices, their rows)
        for lengths, members in by_size.items():
            largest = max((b for b in IMAGE_BUCKETS if b * sum(lengths) <= MAX_PATCHES), default=0)
            if largest == 0:  # too large for a graph: launch overhead is small against its kernels
                done.append((members, self.encode_eager([images[i] for i in members])))
                continue
            for start in range(0, len(members), largest):
                chunk = members[start : start + largest]
                done.append((chunk, self._encode_same_size(lengths, [images[i] for i in chunk])))
        if len(done) == 1:  # one size, one bucket: already in order
            return done[0][1]
        parts: list[Encoded | None] = [None] * len(images)
        for chunk, (embeds, deepstack) in done:
            tokens = [images[i].patches // self.merge_unit for i in chunk]
            for i, e, d in zip(chunk, embeds.split(tokens), deepstack.split(tokens, dim=1)):
                parts[i] = (e, d)
        return torch.cat([e for e, _ in parts]), torch.cat([d for _, d in parts], dim=1)

    def _encode_same_size(self, lengths: tuple[int, ...], images: list[ImageInputs]) -> Encoded:
        bucket = next(b for b in IMAGE_BUCKETS if b >= len(images))
        graph = self.graphs.get((lengths, bucket))
        if graph is None:
            if len(self.graphs) >= MAX_GRAPHS:
                return self.encode_eager(images)
            started = time.perf_counter()
            graph = self._capture(lengths, bucket)
            self.captures = Captures(self.captures.count + 1, self.captures.seconds + time.perf_counter() - started)
        return graph(images)


class _BucketGraph:
    """The tower over ``bucket`` images of one size, on static input buffers."""

    def __init__(self, visual, pixel_values: PixelValues, lengths: tuple[int, ...], bucket: int, rotate: Rotate, capture: bool, pool):  # fmt: skip
        device = visual.patch_embed.proj.weight.device
        rows = bucket * sum(lengths)
        self.visual, self.pixel_values = visual, pixel_values
        self.patch_bytes = torch.zeros(rows, patch_bytes_width(visual), dtype=torch.uint8, device=device)
        self.indices = torch.zeros(rows, 4, dtype=torch.long, device=device)
        self.weights = torch.zeros(rows, 4, device=device)
        self.rotary = torch.zeros(rows, 2, dtype=torch.long, device=device)
        self.attend = SegmentAttention(list(lengths) * bucket, device)
        self.rotate = rotate
        self.capture, self.pool = capture, pool
        if capture:
            graphs, outputs = capture_buckets([bucket], lambda _: self._run(), pool=pool)
            self.graph, self.outputs = graphs[bucket], outputs[bucket]
            self.pool = self.graph.pool()

    def _run(self) -> Encoded:
        return encode_images(self.visual, self.pixel_values(self.patch_bytes), self.indices, self.weights, self.rotary, self.attend, self.rotate)

    def __call__(self, images: list[ImageInputs]) -> Encoded:
        """The images' rows, copied out of the graph's outputs (the next replay overwrites them)."""
        rows = sum(i.patches for i in images)
        for buffer, name in ((self.patch_bytes, "pixel_bytes"), (self.indices, "pos_interp_indices"), (self.weights, "pos_interp_weights"), (self.rotary, "rotary_pos_ids")):  # fmt: skip
            buffer[:rows].copy_(pinned_cat([getattr(i, name) for i in images], buffer.device), non_blocking=True)
        if self.capture:
            self.graph.replay()
            embeds, deepstack = self.outputs
        else:
            embeds, deepstack = self._run()
        tokens = rows // self.visual.spatial_merge_size**2
        return embeds[:tokens].clone(), deepstack[:, :tokens].clone()
