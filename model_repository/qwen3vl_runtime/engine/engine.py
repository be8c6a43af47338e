"""The engine loop: one thread admits, prefills, decodes and streams every running sequence."""

from __future__ import annotations

import threading
import time
import traceback
from contextlib import nullcontext

import torch

from ..tiers import TierTable
from .cancellation import CancellationWatcher
from .detokenizer import IncrementalDetokenizer
from .metrics import EngineMetrics
from .phase_clock import PhaseClock
from .prefill_stream import PrefillStreams, overlap_from_env
from .request import FinishReason, Sequence, StepOutput
from .runner import ModelRunner, TokensToHost
from .scheduler import UNLIMITED, QueueFull, Scheduler
from .server_caps import ServerTierCounts
from .slots import SlotPool
from .step_log import StepLog


class Engine:
    """tiers: who is admitted first and the per-tier caps and timeouts (default: none).
    clock: seconds, monotonic; tests pass a fake one to make queue timeouts deterministic.
    cancel_check_interval_s: how often every live sequence's ``is_cancelled`` is asked, by a
    thread of its own (``CancellationWatcher``): under Triton each ask is an IPC round trip.
    server_counts: the server's other engines' running requests, so that tier caps hold for the
    whole server (several GPUs); None: this engine is the server's only one.
    step_log: where to write one line per step (``StepLog``); None: nowhere.
    prefill_hold_s: how long newcomers may wait for more to share their prefill while many
    streams decode (``Scheduler``); 0: never.
    overlap_prefill: run a prefill beside the decode steps while others decode
    (``prefill_stream``: measured no faster); None: as ``QWEN3VL_OVERLAP_PREFILL`` says (off
    unless "1")."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer,
        *,
        eos_token_ids: set[int],
        num_slots: int,
        tiers: TierTable = UNLIMITED,
        clock=time.monotonic,
        cancel_check_interval_s: float = 0.05,
        server_counts: ServerTierCounts | None = None,
        step_log: StepLog | None = None,
        prefill_hold_s: float = 0.0,
        overlap_prefill: bool | None = None,
        log=print,
    ):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_len = runner.max_len
        self.tiers = tiers
        self.clock = clock
        self.scheduler = Scheduler(SlotPool(num_slots), tiers, clock=clock, server=server_counts, prefill_hold_s=prefill_hold_s)
        self.metrics = EngineMetrics(tiers)
        self.step_log = step_log
        self.log = log
        self._inbox: list[Sequence] = []
        # Request ids cancelled by name (Engine.cancel), kept until their request shows up or a
        # minute passes: a cancel can overtake its request, still in the steps before the decoder.
        self._cancelled_ids: dict[str, float] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="decoder-engine", daemon=True)
        # Submitted and not finished: what the watcher asks about; those it found cancelled (both
        # guarded by _wake).
        self._live: set[Sequence] = set()
        self._client_cancelled: list[Sequence] = []
        self.watcher = CancellationWatcher(self._live_sequences, self._hand_over_cancelled, cancel_check_interval_s, log)
        # Per-sequence helpers, kept here so Sequence stays free of torch and tokenizers.
        self._detok: dict[Sequence, IncrementalDetokenizer] = {}
        self._generators: dict[Sequence, torch.Generator | None] = {}
        # The last step's launches whose tokens the host has not read yet: (sequences, tokens).
        self._in_flight: list[tuple[list[Sequence], TokensToHost]] = []
        self.overlap_prefill = overlap_from_env() if overlap_prefill is None else overlap_prefill
        self.streams = PrefillStreams(runner.device, self.overlap_prefill)
        # A prefill launched beside the decode steps, its tokens not read yet: its sequences
        # decode once they are (``step``).
        self._prefilling: tuple[list[Sequence], TokensToHost] | None = None

    def start(self) -> "Engine":
        self._thread.start()
        self.watcher.start()
        return self

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; raises ValueError at once when it cannot be served (unknown tier,
        too many tokens for its tier, a prompt that fills the context, its tier's queue full)."""
        seq.tier = self.tiers.get(seq.tier_name)
        try:
            if seq.params.max_tokens > seq.tier.max_tokens:
                raise ValueError(
                    f"max_tokens {seq.params.max_tokens} is over the {seq.tier.name} tier's limit of {seq.tier.max_tokens}"
                )
            if seq.prompt_len >= self.max_len:
                raise ValueError(
                    f"the prompt is {seq.prompt_len} tokens; this server's max context is {self.max_len} "
                    f"tokens (prompt + generated)"
                )
            # M-RoPE positions never run ahead of the tokens (an image advances them by its longest
            # side, not its token count), so decode positions stay within [0, max_len): the range
            # the runner's rotary table covers.
            if not 1 - seq.prompt_len <= seq.rope_delta <= 0:
                raise ValueError(f"rope_delta {seq.rope_delta} is outside [{1 - seq.prompt_len}, 0] for a {seq.prompt_len}-token prompt")
            self.runner.check(seq.prompt)
            with self._wake:
                if self._stopping:
                    raise RuntimeError("the decoder is shutting down")
                waiting = len(self.scheduler.waiting[seq.tier.name]) + sum(s.tier is seq.tier for s in self._inbox)
                if waiting >= seq.tier.max_queue:
                    raise QueueFull(f"the {seq.tier.name} tier's queue is full ({waiting} waiting); retry later")
                seq.submitted_at = self.clock()
                self._inbox.append(seq)
                self._live.add(seq)
                self._wake.notify()
        except (ValueError, RuntimeError):
            self.metrics.add(seq.tier.name, "rejected")
            raise
        self.metrics.add(seq.tier.name, "requests")

    def cancel(self, request_id: str) -> None:
        """Cancel a request by id, from any thread; it ends at the next step with CANCELLED.

        Under Triton's ensemble a client's own cancellation never reaches the running decoder
        (docs/triton_findings.md), so the gateway names the request it abandoned instead."""
        with self._wake:
            self._cancelled_ids[request_id] = self.clock()
            self._wake.notify()

    def stop(self) -> None:
        """Stop the loop and end every sequence still queued or running with an error."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self.watcher.stop()
        if self.step_log:
            self.step_log.close()
        for seq in self._all_waiting() + list(self.scheduler.running) + self._inbox:
            self._fail(seq, "the decoder is shutting down")

    def _all_waiting(self) -> list[Sequence]:
        return [seq for queue in self.scheduler.waiting.values() for seq in queue]

    def _live_sequences(self) -> list[Sequence]:
        with self._wake:
            return list(self._live)

    def _hand_over_cancelled(self, seq: Sequence) -> None:
        with self._wake:
            self._client_cancelled.append(seq)
            self._wake.notify()

    # --- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._inbox and not self.scheduler.has_work() and not self._in_flight and not self._prefilling:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                with self.streams.decoding():
                    self.step()
            except Exception:  # a bug must not kill the loop: fail what was running, keep serving
                message = traceback.format_exc()
                self.log(f"decoder step failed:\n{message}")
                self._in_flight, self._prefilling = [], None
                for seq in list(self.scheduler.running):
                    self._fail(seq, f"decoder error: {message.splitlines()[-1]}")

    def _start_sequence(self, seq: Sequence) -> None:
        self._detok[seq] = IncrementalDetokenizer(self.tokenizer, seq.params.stop)
        generator = None
        if not seq.params.greedy:
            generator = torch.Generator()  # on the host: the sampler draws each step's uniform there
            if seq.params.seed is not None:
                generator.manual_seed(seq.params.seed)
            else:
                generator.seed()
        self._generators[seq] = generator
        try:
            self.scheduler.add(seq)
        except QueueFull as exc:  # filled up between submit and now
            self.metrics.add(seq.tier.name, "rejected")
            self._fail(seq, str(exc))

    def step(self) -> None:
        """One engine step: take in submitted sequences, end cancelled ones (handed over by the
        watcher or named by ``cancel``) and timed-out ones, launch the prefill of newcomers (highest tier
        first) and one decode step of the rest, then read and stream the tokens of the step before,
        while the GPU computes this one. The loop thread calls it; tests may call it directly on an
        engine that was not started.

        Launching before reading hides the host's work (detokenizing, sending) behind the GPU's.
        The price: a sequence that stops on an end token or a stop string is decoded one step
        more, and that token is dropped (max_tokens and the context limit are known in advance).

        With ``overlap_prefill``, while others decode, newcomers' prefill goes beside the decode
        steps instead: no other prefill is launched and its sequences do not decode until
        its tokens are read, at the first step that finds them ready (or, with nothing else left
        to wait for, by waiting).

        Its wall time goes to metrics.phase_seconds: "schedule" (admission, cancels, timeouts),
        "prefill" and "decode" (launching them), "wait" (for the GPU to finish the previous
        step), "output" (detokenizing and handing responses over); the vision graphs captured
        inside "prefill" are counted apart (metrics.vision_captures)."""
        phases = PhaseClock()
        with self._wake:
            inbox, self._inbox = self._inbox, []
            client_cancelled, self._client_cancelled = self._client_cancelled, []
            named = dict(self._cancelled_ids) if self._cancelled_ids else {}
        for seq in inbox:
            self._start_sequence(seq)
        for seq in client_cancelled:
            if not seq.finished:  # a sequence may be handed over twice, or end meanwhile
                self._cancel(seq)
        if named:
            for seq in self._all_waiting() + list(self.scheduler.running):
                if seq.request_id in named:
                    self._cancel(seq)
                    named.pop(seq.request_id)
                    with self._wake:
                        self._cancelled_ids.pop(seq.request_id, None)
        if named:
            with self._wake:  # never seen within a minute: forget
                for request_id, at in named.items():
                    if self.clock() - at > 60:
                        self._cancelled_ids.pop(request_id, None)
        for seq in self.scheduler.expired():
            self.metrics.add(seq.tier.name, "timed_out")
            waited = self.clock() - seq.enqueued_at
            self._fail(seq, f"timed out: waited {waited:.2f} s in the {seq.tier.name} queue (limit {seq.tier.queue_timeout_s:g} s)")
        decoding = [seq for seq in self.scheduler.running if seq.launched and self._may_decode(seq)]
        if self._prefilling:  # its sequences decode once its tokens are read
            decoding = [seq for seq in decoding if seq not in self._prefilling[0]]
        self.metrics.batch_size = len(decoding)
        admitted = self.scheduler.admit(len(decoding)) if self._prefilling is None else []
        waits = [self.clock() - seq.submitted_at for seq in admitted] if self.step_log else []
        phases.lap("schedule")
        launched = []
        captured_s = 0.0  # seconds this step's prefill spent capturing vision graphs (a stall)
        if admitted:
            beside = self.overlap_prefill and bool(decoding)
            before = self.runner.vision_captures
            with self.streams.prefilling() if beside else nullcontext():
                tokens = self._launch(admitted, self.runner.prefill)
            if beside:
                self._prefilling = (admitted, tokens)
            else:
                launched.append((admitted, tokens))
            phases.lap("prefill")
            self.metrics.vision_captures = self.runner.vision_captures
            captured_s = self.metrics.vision_captures.seconds - before.seconds
        if decoding:
            launched.append((decoding, self._launch(decoding, self.runner.decode)))
            phases.lap("decode")
        previous, self._in_flight = self._in_flight, launched
        phases.wall.update(wait=0.0, output=0.0)
        phases.cpu.update(wait=0.0, output=0.0)
        if self._prefilling and (self._prefilling[1].ready() or not previous + launched):
            previous.append(self._prefilling)  # ready, or nothing else to wait for
            self.streams.join(self._prefilling[1].event)
            self._prefilling = None
        for seqs, tokens in previous:
            ids = tokens.wait()
            phases.lap("wait")
            for seq, token in zip(seqs, ids):
                if not seq.finished:  # else it stopped a step ago: this token is past its end
                    self._append(seq, token)
            phases.lap("output")
        self.metrics.step_phases(phases.wall, len(admitted))
        if self.step_log:
            waiting = sum(len(queue) for queue in self.scheduler.waiting.values())
            self.step_log.write(
                started=phases.started, phases=phases.wall, cpu=phases.cpu, decoded=len(decoding), prefill_waits=waits, waiting=waiting, captured_s=captured_s
            )  # fmt: skip

    def _launch(self, seqs: list[Sequence], run) -> TokensToHost:
        """Queue ``run`` (the runner's prefill or decode) for these sequences and the sampling of
        their next tokens, fed to their next decode step on the device; the tokens' way to the host."""
        tokens = self.runner.sample(run(seqs), [s.params for s in seqs], [self._generators[s] for s in seqs])
        self.runner.feed(tokens)
        for seq in seqs:
            seq.launched += 1
        return TokensToHost(tokens)

    def _may_decode(self, seq: Sequence) -> bool:
        """Whether one more token may be launched: not past max_tokens nor the context."""
        return seq.launched < seq.params.max_tokens and seq.prompt_len + seq.launched < self.max_len

    def _append(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        self.metrics.add(seq.tier.name, "tokens")
        if len(seq.output_ids) == 1:
            self.metrics.first_token(seq.tier.name, self.clock() - seq.submitted_at)
        detok = self._detok[seq]
        text, hit_stop = detok.add(token)
        if hit_stop or (token in self.eos_token_ids and not seq.params.ignore_eos):
            reason = FinishReason.STOP
        elif len(seq.output_ids) >= seq.params.max_tokens or seq.length >= self.max_len:
            reason = FinishReason.LENGTH
        else:
            self._send(seq, StepOutput(text, (token,)))
            return
        if not hit_stop:
            text += detok.flush()
        self._finish(seq, StepOutput(text, (token,), reason))

    def _send(self, seq: Sequence, output: StepOutput) -> None:
        """Stream one output; a sequence whose response cannot be sent is dropped."""
        try:
            seq.emit(output)
        except Exception:
            self.log(f"request {seq.request_id}: sending a response failed:\n{traceback.format_exc()}")
            if output.finish_reason is None and output.error is None:
                self._finish(seq, StepOutput("", (), FinishReason.CANCELLED))

    def _cancel(self, seq: Sequence) -> None:
        self.metrics.add(seq.tier.name, "cancelled")
        self._finish(seq, StepOutput("", (), FinishReason.CANCELLED))

    def _finish(self, seq: Sequence, output: StepOutput) -> None:
        self.scheduler.retire(seq)
        with self._wake:
            self._live.discard(seq)
        self._detok.pop(seq, None)
        self._generators.pop(seq, None)
        self._send(seq, output)

    def _fail(self, seq: Sequence, message: str) -> None:
        self._finish(seq, StepOutput("", (), error=message))
