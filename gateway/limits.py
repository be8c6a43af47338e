"""Admission limits of the gateway: token buckets per key, in-flight caps per tier.

A key's buckets refill continuously: one for requests (requests per minute) and one for
generated tokens (tokens per minute). A request needs one request token and a non-empty token
bucket; its generated tokens are taken afterwards, so one long answer can overdraw the bucket and
the key then waits until it refills. A refusal says how long to wait (HTTP Retry-After).

A tier holds at most what the server would queue or run for it (max_concurrent + max_queue) in
flight through this gateway; beyond that Triton would refuse anyway, so the gateway answers 429
without a round trip.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


class TokenBucket:
    def __init__(self, per_minute: float, clock=time.monotonic):
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)  # a full minute's worth may come at once
        self.level = self.capacity
        self.clock = clock
        self._at = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self._at) * self.rate)
        self._at = now

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` is there (0: now)."""
        with self._lock:
            self._refill()
            return max(0.0, (amount - self.level) / self.rate) if self.rate > 0 else math.inf

    def take(self, amount: float) -> None:
        """Take `amount`, overdrawing if need be (generated tokens are only known afterwards)."""
        with self._lock:
            self._refill()
            self.level -= amount


@dataclass
class Refusal:
    reason: str
    retry_after_s: float
    limit: str  # which limit: requests, tokens, tier_in_flight (a metrics label)


class KeyLimits:
    """The two buckets of one key."""

    def __init__(self, requests_per_minute: float, tokens_per_minute: float, clock=time.monotonic):
        self.requests = TokenBucket(requests_per_minute, clock)
        self.tokens = TokenBucket(tokens_per_minute, clock)

    def admit(self) -> Refusal | None:
        wait_requests = self.requests.wait_s(1)
        if wait_requests > 0:
            return Refusal("request rate limit reached", wait_requests, "requests")
        wait_tokens = self.tokens.wait_s(1)
        if wait_tokens > 0:
            return Refusal("generated-token rate limit reached", wait_tokens, "tokens")
        self.requests.take(1)
        return None

    def generated(self, tokens: int) -> None:
        self.tokens.take(tokens)


class InFlight:
    """Requests in flight per tier, capped."""

    def __init__(self, caps: dict[str, int]):
        self.caps, self.count = caps, dict.fromkeys(caps, 0)
        self._lock = threading.Lock()

    def enter(self, tier: str) -> bool:
        with self._lock:
            if self.count[tier] >= self.caps[tier]:
                return False
            self.count[tier] += 1
            return True

    def leave(self, tier: str) -> None:
        with self._lock:
            self.count[tier] -= 1
