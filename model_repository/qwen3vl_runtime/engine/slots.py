"""KV-cache slots: each running sequence owns one slot of the preallocated cache."""

from __future__ import annotations


class SlotPool:
    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError("the KV cache needs at least one slot")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self) -> bool:
        return bool(self._free)

    def allocate(self) -> int:
        return self._free.pop()

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)
