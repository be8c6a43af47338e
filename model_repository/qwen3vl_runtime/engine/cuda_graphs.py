"""The decode step captured as CUDA graphs, one per batch-size bucket.

A 2B decode step is several hundred small kernels; launched one by one, the CPU cannot keep the
GPU busy. Each bucket's step is captured once at start-up over static input buffers; a step of
n sequences replays the smallest bucket >= n, the padding rows pointed at a scratch KV slot.
"""

from __future__ import annotations

import torch

from ..fused_forward import fused_decode
from ..text_model import TextModel

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128)


class GraphedDecodeStep:
    def __init__(self, model: TextModel, kv, *, max_batch: int, scratch_slot: int):
        self.model, self.kv = model, kv
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        device = model.norm.weight.device
        self.scratch_slot = scratch_slot
        # Static inputs: the graphs read these addresses; each step copies its batch into them.
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slots = torch.full((max_batch,), scratch_slot, dtype=torch.long, device=device)
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture()

    def _step(self, b: int) -> torch.Tensor:
        return fused_decode(self.model, self.input_ids[:b], self.positions[:b], self.kv, self.slots[:b], self.lengths[:b])

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):  # largest first: the others reuse its memory pool
                for _ in range(2):  # warm up: kernel autotuning and lazy initialisation
                    self._step(b)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[b] = self._step(b)
                pool = graph.pool()
                self.graphs[b] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def __call__(self, input_ids, positions, slots, lengths) -> torch.Tensor:
        """Same contract as ``TextModel.decode`` for n <= max_batch rows (host or device tensors)."""
        n = len(input_ids)
        b = next(size for size in self.buckets if size >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slots[:n].copy_(slots, non_blocking=True)
        self.lengths[:n].copy_(lengths, non_blocking=True)
        if b > n:  # padding rows: write into the scratch slot, attend to one key
            self.slots[n:b].fill_(self.scratch_slot)
            self.lengths[n:b].zero_()
        self.graphs[b].replay()
        return self.logits[b][:n]
