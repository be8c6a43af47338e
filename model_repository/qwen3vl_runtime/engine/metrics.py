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
    # Wall seconds of the engine thread per step phase (see Engine.step), to say where time goes.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    steps: int = 0
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

    def step_phases(self, phases: dict[str, float]) -> None:
        """Add one step's seconds per phase."""
        with self._lock:
            self.steps += 1
            for name, seconds in phases.items():
                self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + seconds

    def phases_snapshot(self) -> tuple[int, dict[str, float]]:
        """(steps so far, seconds per phase so far)."""
        with self._lock:
            return self.steps, dict(self.phase_seconds)

    def snapshot(self) -> dict[str, TierCounters]:
        with self._lock:
            return {name: TierCounters(**vars(c)) for name, c in self.counters.items()}
