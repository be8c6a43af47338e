"""Where one engine step's time goes: wall time and the engine thread's own CPU time per phase.

Through Triton the engine thread's host work took 2.6 ms a 64-stream step against 1.0 ms for the
same code alone (H200, run 20, docs/benchmarks.md): the same Python doing the same work, so the
difference is time the thread was not running, most likely waiting for the GIL that the Python
backend's other threads (requests coming in, responses going out) hold. Wall time alone cannot
tell work from waiting; the thread's CPU time (``time.thread_time``) can: in a phase that only
computes on the host, wall minus CPU is time spent off the CPU. In "wait" (for the GPU) the
CUDA runtime may spin or sleep, so its CPU time says nothing. Plain Python.
"""

from __future__ import annotations

import time


class PhaseClock:
    """Started at a step's start; ``lap(name)`` adds the wall and CPU seconds since the last lap
    (or the start) to phase ``name``."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.started = time.perf_counter()
        self._wall, self._cpu = self.started, time.thread_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        self.wall[name] = self.wall.get(name, 0.0) + wall - self._wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu - self._cpu
        self._wall, self._cpu = wall, cpu
