"""Prefill on a CUDA stream of its own, so that the running streams keep decoding meanwhile.

A prefill is bound by the tensor cores (every prompt token through every weight, the vision
tower before it); a decode step of up to 64 rows by reading the weights. On one stream each
prefill stalls every running stream: through Triton on an H200 (int8, run 19) a prefill and the
step after it took 42% of the engine's time at 64 streams and 18% at 4. Here the prefill runs on
a stream of the lowest priority and the decode steps on one of the highest: the GPU's block
scheduler hands a freed SM to a waiting decode kernel first, and the prefill's blocks fill the
rest. The engine launches at most one prefill at a time and lets its sequences join the decode
batch once its tokens are on the host (``PrefillStreams`` does the stream order; the engine, the
bookkeeping).

**Off by default: it did not pay.** Run 19 (H200, int8, on and off back to back on one server
build; docs/benchmarks.md): through Triton 2,297 against 2,296 tok/s at 4 streams and 11,960
against 12,091 at 64 (perf_analyzer 11,784 against 11,572), the first token's p99 at 64 streams
349 against 271 ms. The share of time in prefill steps fell (8% against 12% at 4 streams, 21%
against 41% at 64) and the steps ran more often (225 against 199 a second at 64), but each
decoded fewer rows (52.7 against 60.4): newcomers waited longer for their prefill (p50 61
against 27 ms), held while the one in flight ran. The engine alone at 4 streams: 2,112 against
2,554 tok/s, a p99 first token of 145 against 23 ms; a guess, not profiled: the low-priority
prefill starved by back-to-back decode graphs.
``QWEN3VL_OVERLAP_PREFILL=1`` turns it on (an A/B switch). On the CPU there are no streams: the
engine takes the same path and finds each prefill done at once.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

OVERLAP_ENV = "QWEN3VL_OVERLAP_PREFILL"


def overlap_from_env() -> bool:
    return os.environ.get(OVERLAP_ENV, "0") == "1"


class PrefillStreams:
    """The decode stream and the prefill stream of an engine that overlaps them (``enabled``);
    otherwise, and on the CPU, none: every step on the engine thread's current stream."""

    def __init__(self, device: torch.device, enabled: bool):
        self.decode = self.prefill = None
        if enabled and device.type == "cuda":
            # Priorities out of the device's range are clamped to its ends: -1024 is the highest.
            self.decode = torch.cuda.Stream(device, priority=-1024)
            self.prefill = torch.cuda.Stream(device, priority=0)
            for stream in (self.decode, self.prefill):  # after the runner's set-up (weights, graphs)
                stream.wait_stream(torch.cuda.current_stream(device))

    def decoding(self):
        """The engine thread's steps: on the decode stream."""
        return torch.cuda.stream(self.decode) if self.decode is not None else nullcontext()

    def prefilling(self):
        """A prefill's launches: on the prefill stream, behind everything queued so far on the
        current one (a freed slot's last decode step may still be writing its KV and token)."""
        if self.prefill is None:
            return nullcontext()
        self.prefill.wait_stream(torch.cuda.current_stream())
        return torch.cuda.stream(self.prefill)

    def join(self, done: torch.cuda.Event | None) -> None:
        """Order the current stream after a prefill (its tokens' event) whose sequences now decode."""
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
