"""Runs the text model for the engine: owns the KV cache and turns sequences into batch tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..host_to_device import pinned_cat, to_device
from ..text_model import TextModel
from .metrics import Captures
from .request import SamplingParams, Sequence
from .sampler import graphable, sample
from .vision import ImageEncoder, ImageInputs

if TYPE_CHECKING:  # CUDA only at run time: its kernels import triton
    from .cuda_graphs import GraphedPrefill


@dataclass(frozen=True)
class PromptInputs:
    """What a prefill needs (host tensors as the preprocess and vision models send them): the
    vision model's outputs, or with the tower in this process (``ModelRunner(vision=...)``) the
    images' patches."""

    input_ids: torch.Tensor  # [L] int64
    positions: torch.Tensor  # [3, L] int64, M-RoPE (t, h, w)
    image_embeds: torch.Tensor | None = None  # [image rows, hidden]
    deepstack: torch.Tensor | None = None  # [3, image rows, hidden]
    images: ImageInputs | None = None


class ModelRunner:
    """On CUDA: GPU kernels, and the decode step replayed from CUDA graphs (``cuda_graphs``).

    graphed_prefill: short prompts' prefill replayed from CUDA graphs too (build-repo
    --graphed-prefill). Off by default: on the H100 a second runner created in the same process
    failed its capture (cause not found yet); a Triton model has one runner per process.
    vision: the vision tower, when this process runs it (prompts then carry their images' patches).
    quantized_kv: the KV cache in int8 with a scale per token and head (``kv_cache``), else the model's dtype.
    """

    def __init__(
        self,
        model: TextModel,
        *,
        num_slots: int,
        max_len: int,
        image_token_id: int,
        cuda_graphs: bool = True,
        graphed_prefill: bool = False,
        vision: ImageEncoder | None = None,
        quantized_kv: bool = False,
    ):
        self.model = model
        self.vision = vision
        self.max_len = max_len
        self.image_token_id = image_token_id
        self.device, self.dtype = model.norm.weight.device, model.norm.weight.dtype
        on_gpu = self.device.type == "cuda"
        # Preallocated once: [slots, kv heads, max_len, head_dim] per layer for K and for V; on
        # the GPU one more slot takes the padding rows of graphed steps.
        self.kv = model.new_cache(num_slots + on_gpu, max_len, quantized=quantized_kv)
        # Each slot's newest sampled token: the next decode step's input, written on the device by
        # ``feed`` so that a step can be launched before the host has read the previous one's tokens.
        self.tokens_by_slot = torch.zeros(num_slots + on_gpu, dtype=torch.long, device=self.device)
        self._launched_slots: torch.Tensor | None = None  # the last prefill's or decode's slots, on the device
        self.graphed_decode = self.graphed_sampler = None
        self._graphed_bucket: int | None = None  # set by a graphed decode, taken by ``sample``
        self._prefill = self._prefill_one_by_one
        # On the GPU with graphed_prefill: the graphs that replay prompts that fit them; None: every
        # prefill eager (scripts/profile_prefill.py sets it to time both on one runner).
        self.prefill_graphs: GraphedPrefill | None = None
        # Per patch grid the vision graphs' buckets captured at start (ImageEncoder.graph_grids).
        self.prepared_vision_graphs: dict[tuple[int, int, int], list[int]] = {}
        if on_gpu:
            from ..gpu import use_gpu_kernels
            from ..kernels.int8_matmul import tuning_prefills
            from .cuda_graphs import GraphedDecodeStep, GraphedPrefill, GraphedSampler

            use_gpu_kernels(model)
            # Decode positions are < max_len (Engine.submit bounds rope_delta): one lookup per step.
            model.rope.prepare_decode(max_len, self.device, self.dtype)
            if vision is not None:
                use_gpu_kernels(vision.visual)
                self.prepared_vision_graphs = vision.warm_up()
            self._prefill = self._graphed_or_eager_prefill
            # The text model's int8 products are tuned for its prefill sizes here, at start; the
            # vision tower's sizes come with the first images, and keep dequantizing.
            with tuning_prefills():
                self._warm_up_prefill(scratch_slot=num_slots)
                if cuda_graphs:
                    self.graphed_decode = GraphedDecodeStep(model, self.kv, self.tokens_by_slot, max_batch=num_slots, scratch_slot=num_slots)
                    self.graphed_sampler = GraphedSampler(self.graphed_decode.logits)
                    if graphed_prefill:
                        self.prefill_graphs = GraphedPrefill(model, self.kv, scratch_slot=num_slots)

    @property
    def vision_captures(self) -> Captures:
        """The vision tower's CUDA graphs captured while serving (each stalls every stream)."""
        return self.vision.captures if self.vision is not None else Captures()

    @torch.inference_mode()
    def _warm_up_prefill(self, scratch_slot: int) -> None:
        """Eager prefills of two lengths into the scratch slot, so that compiling the fused kernels
        for prefill shapes and cuBLAS's first calls land here, not in a request's first token."""
        from ..fused_forward import fused_prefill

        for n in (min(256, self.max_len), min(1024, self.max_len)):
            embeds = torch.zeros(n, self.model.config.hidden_size, device=self.device, dtype=self.dtype)
            positions = torch.arange(n, device=self.device).expand(3, n)
            fused_prefill(self.model, self.kv, embeds, positions, [scratch_slot], [n])

    def check(self, prompt: PromptInputs) -> None:
        """Raise ValueError unless the image rows match the prompt's image tokens (host data)."""
        n_image = int((prompt.input_ids == self.image_token_id).sum())
        if self.vision is not None:
            if prompt.images is not None:
                self.vision.check(prompt.images)
            patches = 0 if prompt.images is None else prompt.images.patches
            if n_image and patches != n_image * self.vision.merge_unit:
                raise ValueError(
                    f"the prompt has {n_image} image tokens but its images have {patches} patches "
                    f"({self.vision.merge_unit} per token)"
                )
            return
        rows = 0 if prompt.image_embeds is None or n_image == 0 else prompt.image_embeds.shape[0]
        if n_image and rows != n_image:
            raise ValueError(f"the prompt has {n_image} image tokens but the vision model gave {rows} rows")
        if n_image and (prompt.deepstack is None or prompt.deepstack.shape[1] != n_image):
            raise ValueError(f"deepstack features must have {n_image} rows per layer")

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Fill each sequence's slot with its (checked) prompt; returns next-token logits [S, vocab].

        On the GPU the prompts run as one batch (their tokens concatenated); on the CPU one by one
        through the reference model. Everything the host decides (which rows are image tokens, the
        indices) is computed from the host's copy of the prompts and queued to the GPU behind the
        step before, never read back: a prefill can be launched while that step still runs.
        """
        self._graphed_bucket = None
        prompts: list[PromptInputs] = [s.prompt for s in seqs]
        ids = torch.cat([p.input_ids for p in prompts])
        embeds = self.model.embed(to_device(ids, self.device))
        image_rows = (ids == self.image_token_id).nonzero().flatten()
        visual_rows = deepstack = None
        if len(image_rows):
            with_images = [p for p in prompts if bool((p.input_ids == self.image_token_id).any())]
            if self.vision is not None:  # every prompt's images in one call
                image_embeds, deepstack = self.vision([p.images for p in with_images])
            else:  # the vision model's outputs, host tensors
                image_embeds = to_device([p.image_embeds for p in with_images], self.device)
                deepstack = to_device([p.deepstack for p in with_images], self.device, dim=1)
            visual_rows = to_device(image_rows, self.device)
            embeds = embeds.index_copy(0, visual_rows, image_embeds.to(self.dtype))
            deepstack = deepstack.to(self.dtype)
        positions = to_device([p.positions for p in prompts], self.device, dim=1)
        lengths, slots = [len(p.input_ids) for p in prompts], [s.slot for s in seqs]
        self._launched_slots = to_device(torch.tensor(slots), self.device)
        return self._prefill(embeds, positions, slots, lengths, visual_rows, deepstack)

    def _graphed_or_eager_prefill(self, embeds, positions, slots, lengths, visual_rows, deepstack) -> torch.Tensor:
        graphs, image_rows = self.prefill_graphs, 0 if deepstack is None else deepstack.shape[1]
        if graphs is not None and graphs.fits(lengths, image_rows):
            return graphs(embeds, positions, slots, lengths, visual_rows, deepstack)
        from ..fused_forward import fused_prefill  # CUDA only: the kernels import triton

        return fused_prefill(self.model, self.kv, embeds, positions, slots, lengths, visual_rows, deepstack)

    def _prefill_one_by_one(self, embeds, positions, slots, lengths, visual_rows, deepstack) -> torch.Tensor:
        visual = torch.zeros(len(embeds), dtype=torch.bool)
        if visual_rows is not None:
            visual[visual_rows] = True
        logits, start, image_row = [], 0, 0
        for slot, n in zip(slots, lengths):
            end = start + n
            mask = visual[start:end]
            rows = int(mask.sum())
            features = deepstack[:, image_row : image_row + rows] if rows else None
            logits.append(self.model.prefill(embeds[start:end], positions[:, start:end], self.kv, slot, visual_mask=mask, deepstack=features))
            start, image_row = end, image_row + rows
        return torch.stack(logits)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's newest launched token (from ``tokens_by_slot``); returns next-token
        logits [B, vocab]. Needs no host sync: positions follow from counts the host keeps."""
        cached = [s.prompt_len + s.launched - 1 for s in seqs]  # the input token is not in the cache yet
        rows = torch.tensor([[n + s.rope_delta for n, s in zip(cached, seqs)], [s.slot for s in seqs], cached])
        if self.graphed_decode is not None:
            logits = self.graphed_decode(*pinned_cat([rows], self.device))
            # Its static slots buffer: read in stream order, before the next step overwrites it.
            self._launched_slots = self.graphed_decode.slots[: len(seqs)]
            self._graphed_bucket = self.graphed_decode.bucket_for(len(seqs))
            return logits
        positions, slots, lengths = to_device(rows, self.device)
        self._launched_slots = slots
        return self.model.decode(self.tokens_by_slot[slots], positions, self.kv, slots, lengths)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
        """One token per row of the logits ``prefill`` or ``decode`` just returned (``sampler.sample``);
        a graphed decode step's sampled rows are replayed from the sampler's graph where their
        settings allow (``sampler.graphable``) and their bucket has one. Those tokens are a static
        buffer: fed and copied to the host in stream order, before the next step's replay."""
        bucket, self._graphed_bucket = self._graphed_bucket, None
        graphed = self.graphed_sampler is not None and bucket in self.graphed_sampler.graphs
        if graphed and not all(p.greedy for p in params) and graphable(params):
            return self.graphed_sampler(bucket, params, generators)
        return sample(logits, params, generators)

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor) -> None:
        """Make ``tokens`` (sampled from the last prefill's or decode's logits, one per sequence, on
        the device) those sequences' next decode inputs; their slots are already on the device."""
        self.tokens_by_slot.index_copy_(0, self._launched_slots, tokens)


class TokensToHost:
    """Sampled token ids on their way to the host: the copy is queued behind the step that
    computes them, and ``wait`` blocks only when they are read, after the engine has launched
    its next step."""

    def __init__(self, tokens: torch.Tensor):
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host, self._done = tokens, None

    @property
    def event(self) -> torch.cuda.Event | None:
        """Recorded on the stream that computed the tokens, after their copy (None on the CPU)."""
        return self._done

    def ready(self) -> bool:
        """Whether ``wait`` would return at once."""
        return self._done is None or self._done.query()

    def wait(self) -> list[int]:
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()
