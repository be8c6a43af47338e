"""One JSON line per engine step, for finding where a load's time goes (off unless asked for).

Counters (``EngineMetrics``) say how much time each phase took in all; they cannot say how many
newcomers waited while 60 streams decoded, or how long a prompt sat queued before its prefill.
The log can: each line is one step's start (``time.perf_counter``: CLOCK_MONOTONIC on Linux, so
a load generator's timestamps compare), its phases in ms (wall, and the engine thread's CPU
time: ``PhaseClock``), the rows it decoded, the prompts it prefilled with how long each had
waited since it was submitted, how many were still queued after admission, and (``captured_ms``,
only when it happened) the part of the prefill phase spent capturing the vision tower's CUDA
graphs for a size first seen. Tritonserver's decoder writes it where ``QWEN3VL_STEP_LOG`` says
(``STEP_LOG_ENV``); scripts/bench_triton.py --step-log sets it. A diagnostic for load tests: about
150 bytes a step (run 15's benchmark of record left 8-9 MB per server). Plain Python.
"""

from __future__ import annotations

import json
from pathlib import Path

STEP_LOG_ENV = "QWEN3VL_STEP_LOG"


class StepLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A line at a time (a write call per step, microseconds): a server stopped before the
        # engine's stop() still leaves every step it ran.
        self._file = self.path.open("a", buffering=1)

    def write(self, *, started: float, phases: dict[str, float], cpu: dict[str, float], decoded: int, prefill_waits: list[float], waiting: int, captured_s: float = 0.0) -> None:  # fmt: skip
        """started: perf_counter seconds; phases, cpu: seconds of wall time and of the engine
        thread's CPU time per phase (``PhaseClock``); prefill_waits: seconds each prefilled prompt
        spent between its submit and its admission in this step; captured_s: seconds of the
        prefill phase spent capturing vision graphs."""
        line = {
            "t": round(started, 6),
            "ms": {name: round(seconds * 1e3, 3) for name, seconds in phases.items()},
            "cpu_ms": {name: round(seconds * 1e3, 3) for name, seconds in cpu.items()},
            "decoded": decoded,
            "prefilled": len(prefill_waits),
            "prefill_waits_ms": [round(w * 1e3, 1) for w in prefill_waits],
            "waiting": waiting,
        }
        if captured_s:
            line["captured_ms"] = round(captured_s * 1e3, 3)
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()
