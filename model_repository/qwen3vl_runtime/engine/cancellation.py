"""Asks every live sequence whether its client cancelled, on a thread of its own.

Under Triton each ``is_cancelled`` is an IPC round trip to the server (56-84 us on the CPU
machine: scripts/probe_response_path.py). Asked from the engine's loop, 64 streams every 50 ms
made that loop wait about 4 ms each time, which showed as 0.35 ms of "schedule" per step at 64
streams through Triton on the H200 (0.05 alone; run 13, docs/benchmarks.md). Here the loop only
reads a flag; the round trips release the GIL, so they overlap the decode loop's work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .request import Sequence


class CancellationWatcher:
    """live(): the sequences to ask (a snapshot); log: where a failed ask is reported."""

    def __init__(self, live: Callable[[], list[Sequence]], interval_s: float, log: Callable[[str], None] = print):
        self._live, self.interval_s, self._log = live, interval_s, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cancellation-watcher", daemon=True)

    def start(self) -> "CancellationWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def poll(self) -> None:
        """Ask each live sequence once; flag those cancelled (the engine ends them at its next step)."""
        for seq in self._live():
            if seq.finished or seq.cancel_requested:
                continue
            try:
                seq.cancel_requested = bool(seq.is_cancelled())
            except Exception as exc:  # noqa: BLE001 - e.g. a sender closed as the sequence finished
                if not seq.finished:
                    self._log(f"request {seq.request_id}: asking whether it was cancelled failed: {exc}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()
