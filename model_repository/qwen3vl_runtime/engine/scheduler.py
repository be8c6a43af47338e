"""Which sequences run this step: admit waiting ones while KV slots are free (first come, first
served), retire finished ones. Plain Python, no torch."""

from __future__ import annotations

from collections import deque

from .request import Sequence
from .slots import SlotPool


class Scheduler:
    def __init__(self, slots: SlotPool, prefill_token_budget: int = 4096):
        self.slots = slots
        self.prefill_token_budget = prefill_token_budget
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into the running batch; they need a prefill this step.

        Prompts are prefilled together, up to a token budget per step (at least one prompt), so a
        burst of newcomers is batched without stalling the running streams for long.
        """
        admitted, tokens = [], 0
        while self.waiting and self.slots.can_allocate():
            if admitted and tokens + self.waiting[0].prompt_len > self.prefill_token_budget:
                break
            seq = self.waiting.popleft()
            tokens += seq.prompt_len
            seq.slot = self.slots.allocate()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def retire(self, seq: Sequence) -> None:
        """Drop a finished, failed or cancelled sequence, waiting or running; free its slot."""
        seq.finished = True
        if seq.slot is not None:
            self.running.remove(seq)
            self.slots.free(seq.slot)
            seq.slot = None
        elif seq in self.waiting:
            self.waiting.remove(seq)
