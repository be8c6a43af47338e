"""The decode step captured as CUDA graphs, one per batch-size bucket.

A 2B decode step is several hundred small kernels; launched one by one, the CPU cannot keep the
GPU busy. Each bucket's step is captured once at start-up over static input buffers; a step of
n sequences replays the smallest bucket >= n, the padding rows pointed at a scratch KV slot.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..fused_forward import fused_decode, prompt_rows, static_prefill
from ..host_to_device import pinned_cat, to_device
from ..kernels.prompt_attention import TILE_FIELDS, max_tiles, tile_table
from ..text_model import TextModel
from .request import SamplingParams
from .sampler import GRAPH_MAX_ROWS, PADDING_ROW, SETTINGS, graph_settings, sample_graphed

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128)


@torch.inference_mode()
def capture_buckets(buckets, run: Callable[[int], torch.Tensor], prepare: Callable[[int], None] = lambda b: None, pool=None):
    """One CUDA graph per bucket of ``run(bucket)`` -> (graphs, their output tensors), by bucket.

    Largest first, so the smaller graphs reuse its memory pool (or ``pool``, another capture's);
    two eager runs before each capture do the kernels' autotuning and lazy initialisation.
    ``prepare(bucket)`` sets the static inputs the capture reads.

    Captures are thread-local: in CUDA's default (global) mode a potentially unsafe call from any
    other thread of the process during a capture (an event synchronize, an allocation) invalidates
    it: the likely cause of a second runner's failed capture in a test process whose first engine
    thread was still running (cudaErrorStreamCaptureInvalidated, docs/benchmarks.md). The vision tower
    and the int8 tuner also capture while serving, with the response thread alive."""
    graphs, outputs = {}, {}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for b in sorted(buckets, reverse=True):
            prepare(b)
            for _ in range(2):
                run(b)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                outputs[b] = run(b)
            pool = graph.pool()
            graphs[b] = graph
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graphs, outputs


class GraphedDecodeStep:
    """tokens_by_slot: [slots] each slot's newest token, on the device; the step's input ids are
    gathered from it inside the graph, so sampled tokens never go through the host on their way in."""

    def __init__(self, model: TextModel, kv, tokens_by_slot: torch.Tensor, *, max_batch: int, scratch_slot: int):
        self.model, self.kv, self.tokens_by_slot = model, kv, tokens_by_slot
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        device = model.norm.weight.device
        self.scratch_slot = scratch_slot
        # Static inputs: the graphs read these addresses; each step copies its batch into them.
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slots = torch.full((max_batch,), scratch_slot, dtype=torch.long, device=device)
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.graphs, self.logits = capture_buckets(self.buckets, self._step)

    def bucket_for(self, n: int) -> int:
        """The graph a step of n rows replays (its logits are what GraphedSampler reads)."""
        return next(size for size in self.buckets if size >= n)

    def _step(self, b: int) -> torch.Tensor:
        slots = self.slots[:b]
        return fused_decode(self.model, self.tokens_by_slot[slots], self.positions[:b], self.kv, slots, self.lengths[:b])

    def __call__(self, positions, slots, lengths) -> torch.Tensor:
        """``TextModel.decode`` of each slot's newest token, for n <= max_batch rows (host tensors
        in pinned memory, or device tensors) -> logits [n, vocab]."""
        n = len(slots)
        b = self.bucket_for(n)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slots[:n].copy_(slots, non_blocking=True)
        self.lengths[:n].copy_(lengths, non_blocking=True)
        if b > n:  # padding rows: write into the scratch slot, attend to one key
            self.slots[n:b].fill_(self.scratch_slot)
            self.lengths[n:b].zero_()
        self.graphs[b].replay()
        return self.logits[b][:n]


class GraphedSampler:
    """Sampling of a graphed decode step's logits, replayed from one CUDA graph per batch bucket.

    Eager, ``sampler.sample`` is a few dozen small launches per step (not counted): on the H200,
    1.2 ms at one row (scripts/bench_sampler.py --device cuda), which made a sampled stream's decode
    step host-bound: 2.18 ms per token against 1.34 greedy (bench_engine.py --sampled, run 14;
    graphed, 1.61). Each bucket's graph reads that bucket's decode logits in place; the rows'
    settings and uniform draws cross in one copy per step. Greedy-only steps skip it (one argmax),
    and so do buckets above ``max_rows`` (``sampler.GRAPH_MAX_ROWS``), where the graph measured
    slower."""

    def __init__(self, logits_by_bucket: dict[int, torch.Tensor], max_rows: int = GRAPH_MAX_ROWS):
        self.logits = {b: t for b, t in logits_by_bucket.items() if b <= max_rows}
        some = next(iter(self.logits.values()))
        self.vocab = some.shape[-1]
        self.settings = torch.zeros(max(self.logits), SETTINGS, dtype=torch.float32, device=some.device)
        self.graphs, self.tokens = capture_buckets(self.logits, self._sample, prepare=self._greedy)

    def _greedy(self, b: int) -> None:
        self.settings[:b] = torch.tensor(PADDING_ROW)

    def _sample(self, b: int) -> torch.Tensor:
        return sample_graphed(self.logits[b], self.settings[:b])

    def __call__(self, bucket: int, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
        """Tokens [len(params)] for the rows of ``bucket``'s last decode (``sampler.graphable`` params)."""
        self.settings[:bucket].copy_(pinned_cat([graph_settings(params, generators, bucket, self.vocab)], self.settings.device), non_blocking=True)
        self.graphs[bucket].replay()
        return self.tokens[bucket][: len(params)]


class GraphedPrefill:
    """Prefill of up to ``max_prompts`` prompts captured as CUDA graphs, one per token bucket.

    Eager, a prefill is hundreds of launches: on the H100 one 243-token prompt took 25.5 ms (bf16,
    scripts/profile_decode.py), and replayed from a graph the engine's time to first token was
    6.6 ms (docs/benchmarks.md). Through Triton at 64 streams, bursts of 3-16 image prompts (over
    run 15's 512-token largest bucket) held the engine thread 27-81 ms each, eagerly (the step log,
    docs/benchmarks.md run 15): the buckets now reach the scheduler's prefill budget (4,096 tokens,
    16 prompts). Run 16 (H200, int8, scripts/profile_prefill.py --graphed-prefill): captured in
    1.4 s, 0.46 GiB; four image prompts 18.5 ms against 48.1 eager, eight 32.7 against 42.9, and
    sixteen 58.7 against 57.3 (GPU-bound there, but the engine thread is not held launching).
    Run 22 (H100, int8, the same script): with the prompt attention in tiles of 64 rows instead of
    the decode kernel's one row per program, sixteen prompts replay in 47.8 ms against 58.6 (eager
    47.6), four in 15.0 against 18.0, one in 7.75 against 8.54.
    A prompt longer than LONGEST_PROMPT runs eagerly: the attention here re-reads each prompt's
    prefix once per tile of 64 rows (quadratic in a prompt's length, not in the batch's); the limit
    dates from when it did so once per row, and was not measured again.
    """

    # Steps of half an octave past 512: a burst of n 243-token image prompts pads to at most 1.5x
    # its tokens (three pad 729 to 768, not 1,024). The graphs share one memory pool, the largest's.
    TOKEN_BUCKETS = (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)
    LONGEST_PROMPT = 512

    def __init__(self, model: TextModel, kv, *, scratch_slot: int, max_prompts: int = 16, max_image_rows: int = 4096):
        self.model, self.kv = model, kv
        self.scratch_slot, self.max_prompts = scratch_slot, max_prompts
        device, hidden = model.norm.weight.device, model.config.hidden_size
        top = self.TOKEN_BUCKETS[-1]
        # Static inputs sized for the largest bucket (+1 dump row that padding points at).
        self.embeds = torch.zeros(top + 1, hidden, device=device, dtype=model.norm.weight.dtype)
        self.positions = torch.zeros(3, top + 1, dtype=torch.long, device=device)
        self.token_slots = torch.full((top + 1,), scratch_slot, dtype=torch.long, device=device)
        self.cache_positions = torch.zeros(top + 1, dtype=torch.long, device=device)
        self.visual_rows = torch.zeros(max_image_rows, dtype=torch.long, device=device)
        self.deepstack = torch.zeros(3, max_image_rows, hidden, device=device, dtype=self.embeds.dtype)
        self.last_rows = torch.zeros(max_prompts, dtype=torch.long, device=device)
        # The prompt attention's tiles (kernels/prompt_attention.py): a bucket's graph runs as many
        # as its rows in max_prompts prompts may need.
        self.tiles = torch.zeros(max_tiles(top + 1, max_prompts), TILE_FIELDS, dtype=torch.int32, device=device)
        self.graphs, self.logits = capture_buckets(self.TOKEN_BUCKETS, self._run, prepare=self._prepare_capture)

    def fits(self, lengths: list[int], image_rows: int) -> bool:
        """Whether prompts of these lengths (and image rows) can be replayed from a graph."""
        return (sum(lengths) <= self.TOKEN_BUCKETS[-1] and len(lengths) <= self.max_prompts
                and max(lengths) <= self.LONGEST_PROMPT and image_rows <= len(self.visual_rows))  # fmt: skip

    def _run(self, b: int) -> torch.Tensor:
        n = b + 1  # the bucket's rows plus its dump row
        return static_prefill(
            self.model, self.kv, self.embeds[:n], self.positions[:, :n], self.token_slots[:n],
            self.cache_positions[:n], self.visual_rows, self.deepstack, self.last_rows, self.tiles[: max_tiles(n, self.max_prompts)],
        )  # fmt: skip

    def _prepare_capture(self, b: int) -> None:
        """In-range indices for bucket b while it is captured: every row padding."""
        self._reset(b)
        self._set_tiles(b, [], [])

    def _set_tiles(self, b: int, slots: list[int], lengths: list[int]) -> None:
        """Bucket b's tiles: the prompts', then its padding rows and dump row on the scratch slot."""
        table = tile_table(slots, lengths, b + 1, self.scratch_slot, self.max_prompts)  # the grid of b's graph
        self.tiles[: len(table)].copy_(to_device(table, self.tiles.device))

    def _reset(self, b: int) -> None:
        """Point every row of bucket b, and every image row, at the dump row and scratch slot."""
        self.token_slots[: b + 1].fill_(self.scratch_slot)
        self.cache_positions[: b + 1].zero_()
        self.positions[:, : b + 1].zero_()
        self.visual_rows.fill_(b)
        self.deepstack.zero_()
        self.last_rows.fill_(b)

    def __call__(self, embeds, positions, slots: list[int], lengths: list[int], visual_rows, deepstack) -> torch.Tensor:
        """Same contract as ``fused_prefill`` (inputs already on the GPU) -> logits [S, vocab]."""
        tokens = embeds.shape[0]
        b = next(size for size in self.TOKEN_BUCKETS if size >= tokens)
        self._reset(b)
        self.embeds[:tokens].copy_(embeds)
        self.positions[:, :tokens].copy_(positions)
        token_slots, cache_positions, last_rows = prompt_rows(slots, lengths, embeds.device)
        self.token_slots[:tokens].copy_(token_slots)
        self.cache_positions[:tokens].copy_(cache_positions)
        if deepstack is not None:
            self.visual_rows[: len(visual_rows)].copy_(visual_rows)
            self.deepstack[:, : len(visual_rows)].copy_(deepstack)
        self.last_rows[: len(lengths)].copy_(last_rows)
        self._set_tiles(b, slots, lengths)
        self.graphs[b].replay()
        return self.logits[b][: len(lengths)]
