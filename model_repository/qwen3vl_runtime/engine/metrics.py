"""Counters the engine keeps per tier, read by the Triton adapter for Prometheus. Plain Python."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..tiers import TierTable


@dataclass
class TierCounters:
    requests: int = 0  # accepted into the queue
    rejected: int = 0  # refused at once (queue full, bad request)
    timed_out: int = 0  # waited past the tier's queue timeout
    cancelled: int = 0  # ended early: the client left
    tokens: int = 0  # generated
    ttft_seconds_sum: float = 0.0
    ttft_count: int = 0


@dataclass
class EngineMetrics:
    """Counters only grow; gauges (queue length, running, KV use) come from the scheduler."""

    tiers: TierTable
    counters: dict[str, TierCounters] = field(init=False)
    batch_size: int = 0  # sequences in the last decode step
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self):
        self.counters = {t.name: TierCounters() for t in self.tiers.tiers}

    def add(self, tier: str, name: str, amount: float = 1) -> None:
        with self._lock:
            counters = self.counters[tier]
            setattr(counters, name, getattr(counters, name) + amount)

    def first_token(self, tier: str, seconds: float) -> None:
        with self._lock:
            self.counters[tier].ttft_seconds_sum += seconds
            self.counters[tier].ttft_count += 1

    def snapshot(self) -> dict[str, TierCounters]:
        with self._lock:
            return {name: TierCounters(**vars(c)) for name, c in self.counters.items()}
