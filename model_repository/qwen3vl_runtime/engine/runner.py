"""Runs the text model for the engine: owns the KV cache and turns sequences into batch tensors."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..text_model import TextModel
from .request import Sequence


@dataclass(frozen=True)
class PromptInputs:
    """What a prefill needs (host tensors as the preprocess and vision models send them)."""

    input_ids: torch.Tensor  # [L] int64
    positions: torch.Tensor  # [3, L] int64, M-RoPE (t, h, w)
    image_embeds: torch.Tensor | None = None  # [image rows, hidden]
    deepstack: torch.Tensor | None = None  # [3, image rows, hidden]


class ModelRunner:
    """On CUDA: GPU kernels, and the decode step replayed from CUDA graphs (``cuda_graphs``)."""

    def __init__(self, model: TextModel, *, num_slots: int, max_len: int, image_token_id: int, cuda_graphs: bool = True):
        self.model = model
        self.max_len = max_len
        self.image_token_id = image_token_id
        self.device, self.dtype = model.norm.weight.device, model.norm.weight.dtype
        on_gpu = self.device.type == "cuda"
        # Preallocated once: [slots, kv heads, max_len, head_dim] per layer for K and for V; on
        # the GPU one more slot takes the padding rows of graphed steps.
        self.kv = model.new_cache(num_slots + on_gpu, max_len)
        self.graphed_decode = None
        self._prefill = model.prefill
        if on_gpu:
            from ..fused_forward import fused_prefill
            from ..gpu import use_gpu_kernels
            from .cuda_graphs import GraphedDecodeStep

            use_gpu_kernels(model)
            self._prefill = partial(fused_prefill, model)
            if cuda_graphs:
                self.graphed_decode = GraphedDecodeStep(model, self.kv, max_batch=num_slots, scratch_slot=num_slots)

    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> torch.Tensor:
        """Fill the sequence's slot with its prompt; returns the next-token logits: [vocab]."""
        prompt: PromptInputs = seq.prompt
        ids = prompt.input_ids.to(self.device)
        embeds = self.model.embed(ids)
        visual = ids == self.image_token_id
        deepstack = None
        n_image = int(visual.sum())
        if n_image:
            if prompt.image_embeds is None or prompt.image_embeds.shape[0] != n_image:
                rows = 0 if prompt.image_embeds is None else prompt.image_embeds.shape[0]
                raise ValueError(f"the prompt has {n_image} image tokens but the vision model gave {rows} rows")
            embeds = embeds.clone()
            embeds[visual] = prompt.image_embeds.to(self.device, self.dtype)
            deepstack = prompt.deepstack.to(self.device, self.dtype)
        return self._prefill(
            embeds, prompt.positions.to(self.device), self.kv, seq.slot, visual_mask=visual, deepstack=deepstack
        )

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's last token; returns next-token logits: [B, vocab]."""
        cached = [s.length - 1 for s in seqs]  # the last output token is not in the cache yet
        ids = torch.tensor([s.output_ids[-1] for s in seqs])
        positions = torch.tensor([n + s.rope_delta for n, s in zip(cached, seqs)])
        slots = torch.tensor([s.slot for s in seqs])
        lengths = torch.tensor(cached)
        if self.graphed_decode is not None:
            return self.graphed_decode(ids, positions, slots, lengths)
        to = lambda t: t.to(self.device)  # noqa: E731
        return self.model.decode(to(ids), to(positions), self.kv, to(slots), to(lengths))
