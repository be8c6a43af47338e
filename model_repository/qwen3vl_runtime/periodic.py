"""A daemon thread that calls one function on an interval: the decoder's background chores
(publishing metrics, asking for cancellations) that must stay off the decode loop."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Periodic:
    """Calls ``tick()`` every ``interval_s`` seconds on a daemon thread named ``name``, from
    ``start()`` until ``stop()`` or until ``tick`` returns False."""

    def __init__(self, name: str, interval_s: float, tick: Callable[[], bool | None]):
        self.interval_s = interval_s
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self._tick() is False:
                return
