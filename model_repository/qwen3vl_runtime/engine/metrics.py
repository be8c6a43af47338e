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


@dataclass(frozen=True)
class Captures:
    """The vision tower's CUDA graphs captured while serving (on first sight of an image size in a
    bucket), and the seconds those calls spent capturing: every stream stalls meanwhile
    (``vision_graphs``)."""

    count: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class StepTotals:
    """The engine thread's totals so far: steps, wall seconds per step phase, prefill steps and
    the prompts they took (prompts per prefill says whether newcomers are batched or trickle in),
    and the vision graphs captured while serving with their seconds (each a stall of every stream)."""

    steps: int
    seconds: dict[str, float]
    prefill_steps: int
    prefilled: int
    vision_captures: Captures = Captures()

    def since(self, before: "StepTotals") -> dict:
        """What happened between ``before`` and these totals, as the benchmarks report it."""
        steps, prefills = self.steps - before.steps, self.prefill_steps - before.prefill_steps
        per_step = {name: round((total - before.seconds.get(name, 0.0)) / max(steps, 1) * 1e3, 3) for name, total in self.seconds.items()}
        prompts = round((self.prefilled - before.prefilled) / prefills, 2) if prefills else None
        return {
            "steps": steps, "phase_ms_per_step": per_step, "prefill_steps": prefills, "prompts_per_prefill": prompts,
            "vision_graph_captures": self.vision_captures.count - before.vision_captures.count,
            "vision_graph_capture_ms": round((self.vision_captures.seconds - before.vision_captures.seconds) * 1e3, 1),
        }  # fmt: skip


@dataclass
class EngineMetrics:
    """Counters only grow; gauges (queue length, running, KV use) come from the scheduler."""

    tiers: TierTable
    counters: dict[str, TierCounters] = field(init=False)
    batch_size: int = 0  # sequences in the last decode step
    # Wall seconds of the engine thread per step phase (see Engine.step), to say where time goes.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    prefill_steps: int = 0
    prefilled: int = 0  # prompts, over prefill_steps
    vision_captures: Captures = Captures()  # the vision tower's CUDA graphs captured while serving (its totals)
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

    def step_phases(self, phases: dict[str, float], prefilled: int) -> None:
        """Add one step's seconds per phase and the prompts it prefilled."""
        with self._lock:
            self.steps += 1
            self.prefill_steps += prefilled > 0
            self.prefilled += prefilled
            for name, seconds in phases.items():
                self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + seconds

    def step_totals(self) -> StepTotals:
        with self._lock:
            return StepTotals(self.steps, dict(self.phase_seconds), self.prefill_steps, self.prefilled, self.vision_captures)

    def snapshot(self) -> dict[str, TierCounters]:
        with self._lock:
            return {name: TierCounters(**vars(c)) for name, c in self.counters.items()}
