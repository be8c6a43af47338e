"""A circuit breaker toward Triton: after repeated failures, fail fast; probe before closing again.

closed: requests pass; `failure_threshold` failures in a row open it.
open: requests fail at once (503) for `reset_after_s`; then one probe request passes (half-open).
half-open: the probe's success closes it, its failure opens it again.
Only failures to reach Triton or to get an answer in time count, not refused requests.
"""

from __future__ import annotations

import threading
import time


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 5, reset_after_s: float = 10.0, clock=time.monotonic):
        self.failure_threshold, self.reset_after_s, self.clock = failure_threshold, reset_after_s, clock
        self.state = "closed"
        self.failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._lock = threading.Lock()

    def allow(self) -> float:
        """0 when a request may go to Triton now, else the seconds to wait before asking again."""
        with self._lock:
            if self.state == "closed":
                return 0.0
            if self._probing:  # the probe is out: wait for its verdict
                return 1.0
            wait = self._opened_at + self.reset_after_s - self.clock()
            if wait > 0:
                return wait
            self.state, self._probing = "half-open", True
            return 0.0

    def success(self) -> None:
        with self._lock:
            self.state, self.failures, self._probing = "closed", 0, False

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            if self.state == "half-open" or self.failures >= self.failure_threshold:
                self.state, self._opened_at, self._probing = "open", self.clock(), False
