"""Asks every live sequence whether its client cancelled, on a thread of its own.

Under Triton each ``is_cancelled`` is an IPC round trip to the server (56-84 us on the CPU
machine: scripts/probe_response_path.py). Asked from the engine's loop, 64 streams every 50 ms
made that loop wait 64 such round trips each time: at 64 streams through Triton on the H200 its
"schedule" phase took 0.353 ms per step (run 13), 0.043 with this watcher (run 14,
scripts/bench_gpu.py; docs/benchmarks.md). The round trips release the GIL, so they overlap the
decode loop's work; the loop only ends the sequences handed to it.
"""

from __future__ import annotations

from collections.abc import Callable

from ..periodic import Periodic
from .request import Sequence


class CancellationWatcher(Periodic):
    """live(): the sequences to ask (a snapshot); cancelled(seq): hands one over to be ended; log:
    where a failed ask is reported."""

    def __init__(self, live: Callable[[], list[Sequence]], cancelled: Callable[[Sequence], None], interval_s: float,
                 log: Callable[[str], None] = print):  # fmt: skip
        super().__init__("cancellation-watcher", interval_s, self.poll)
        self._live, self._cancelled, self._log = live, cancelled, log

    def poll(self) -> None:
        """Ask each live sequence once; hand over those cancelled (the engine ends them at its next
        step; one handed over and not yet ended is asked again at the next poll)."""
        for seq in self._live():
            if seq.finished:
                continue
            try:
                if seq.is_cancelled():
                    self._cancelled(seq)
            except Exception as exc:  # noqa: BLE001 - e.g. a sender closed as the sequence finished
                if not seq.finished:
                    self._log(f"request {seq.request_id}: asking whether it was cancelled failed: {exc}")
