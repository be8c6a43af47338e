"""Numbered, timed steps on stderr for the long parts of a build."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Progress:
    def __init__(self, total: int, stream=None):
        self.total = total
        self.stream = stream or sys.stderr
        self.done = 0
        self.timings: dict[str, float] = {}

    def say(self, message: str) -> None:
        print(f"      {message}", file=self.stream, flush=True)

    @contextmanager
    def step(self, title: str):
        self.done += 1
        print(f"[{self.done}/{self.total}] {title} ...", file=self.stream, flush=True)
        start = time.perf_counter()
        yield self
        seconds = time.perf_counter() - start
        self.timings[title] = round(seconds, 2)
        print(f"      done in {seconds:.1f} s", file=self.stream, flush=True)
