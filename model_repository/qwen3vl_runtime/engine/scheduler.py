"""Which sequences run this step, by tier: admit waiting ones in priority order while KV slots are
free and each tier stays under its concurrency cap; reject those that waited past their tier's
timeout; retire finished ones. Running sequences are never preempted: when slots are short, lower
tiers wait (and time out) instead. With several engines in one server (one per GPU) the caps are
the server's: ``server_caps`` counts what the other engines run. Plain Python, no torch."""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext

from ..tiers import Tier, TierTable
from .request import Sequence
from .server_caps import ServerTierCounts
from .slots import SlotPool

# Without a tier table: one tier, no caps, no timeouts (benchmarks, tests of the engine alone).
UNLIMITED = TierTable((Tier("default", 1, 1 << 30, float("inf"), 1 << 30, 1 << 30),), "default")


class QueueFull(ValueError):
    """The request's tier has max_queue requests waiting already."""


# Below this many streams decoding, newcomers are never held (``Scheduler.prefill_hold_s``): a
# prefill stalls few streams, and the first token matters more.
HOLD_MIN_DECODING = 16


class Scheduler:
    """server: the running requests of the server's other engines (None: this engine is alone).

    prefill_hold_s: while HOLD_MIN_DECODING or more streams decode, newcomers wait up to this long
    (from the oldest's arrival) for more to join their prefill, unless they already fill the
    prefill budget or the free slots. A prefill stalls every running stream, and few prompts at a
    time cost more per prompt: on an H200 (int8, 448 px image + 40 tokens, scripts/profile_prefill.py,
    run 16) 8.1 ms for one, 18.5 for four, 58.7 for sixteen; through Triton at 64 streams the
    engine prefilled 2.7 prompts at a time (docs/benchmarks.md). 0: admit at every step."""

    def __init__(
        self,
        slots: SlotPool,
        tiers: TierTable = UNLIMITED,
        prefill_token_budget: int = 4096,
        clock=time.monotonic,
        server: ServerTierCounts | None = None,
        prefill_hold_s: float = 0.0,
    ):
        self.slots = slots
        self.server = server
        self.tiers = tiers
        self.prefill_token_budget = prefill_token_budget
        self.prefill_hold_s = prefill_hold_s
        self.clock = clock
        self.waiting: dict[str, deque[Sequence]] = {t.name: deque() for t in tiers.by_priority()}
        self.running: list[Sequence] = []
        self.running_by_tier: dict[str, int] = {t.name: 0 for t in tiers.tiers}

    def add(self, seq: Sequence) -> None:
        """Queue a sequence in its tier (``seq.tier``, set by the engine); QueueFull if full."""
        queue = self.waiting[seq.tier.name]
        if len(queue) >= seq.tier.max_queue:
            raise QueueFull(f"the {seq.tier.name} tier's queue is full ({len(queue)} waiting); retry later")
        seq.enqueued_at = self.clock()
        queue.append(seq)

    def has_work(self) -> bool:
        return bool(self.running) or any(self.waiting.values())

    def expired(self) -> list[Sequence]:
        """Remove and return the waiting sequences whose wait exceeds their tier's timeout."""
        now, late = self.clock(), []
        for queue in self.waiting.values():
            # FIFO within a tier: the oldest are at the front.
            while queue and now - queue[0].enqueued_at > queue[0].tier.queue_timeout_s:
                late.append(queue.popleft())
        return late

    def admit(self, decoding: int = 0) -> list[Sequence]:
        """Move waiting sequences into the running batch, highest tier first; they need a prefill.

        Prompts are prefilled together up to a token budget per step (at least one prompt), so a
        burst of newcomers is batched without stalling the running streams for long.
        decoding: the streams this step decodes (newcomers may be held while there are many).
        """
        if not any(self.waiting.values()) or not self.slots.can_allocate() or self._holding(decoding):
            return []
        with self.server.admitting() if self.server else nullcontext({}) as elsewhere:
            admitted = self._admit(elsewhere)
            if admitted and self.server:
                self.server.publish(self.running_by_tier)
        return admitted

    def _holding(self, decoding: int) -> bool:
        if self.prefill_hold_s <= 0 or decoding < HOLD_MIN_DECODING:
            return False
        queued = [seq for queue in self.waiting.values() for seq in queue]
        full = sum(seq.prompt_len for seq in queued) >= self.prefill_token_budget or len(queued) >= self.slots.num_free
        return not full and self.clock() - min(seq.enqueued_at for seq in queued) < self.prefill_hold_s

    def _admit(self, elsewhere: dict[str, int]) -> list[Sequence]:
        admitted, tokens = [], 0
        for tier in self.tiers.by_priority():
            queue = self.waiting[tier.name]
            cap = tier.max_concurrent - elsewhere.get(tier.name, 0)
            while queue and self.slots.can_allocate() and self.running_by_tier[tier.name] < cap:
                if admitted and tokens + queue[0].prompt_len > self.prefill_token_budget:
                    return admitted
                seq = queue.popleft()
                seq.slot = self.slots.allocate()
                self.running.append(seq)
                self.running_by_tier[tier.name] += 1
                admitted.append(seq)
                tokens += seq.prompt_len
        return admitted

    def retire(self, seq: Sequence) -> None:
        """Drop a finished, failed or cancelled sequence, waiting or running; free its slot."""
        seq.finished = True
        if seq.slot is not None:
            self.running.remove(seq)
            self.running_by_tier[seq.tier.name] -= 1
            if self.server:
                self.server.publish(self.running_by_tier)
            self.slots.free(seq.slot)
            seq.slot = None
        elif seq.tier is not None and seq in self.waiting[seq.tier.name]:
            self.waiting[seq.tier.name].remove(seq)
