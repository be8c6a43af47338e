"""Streamed responses sent off the engine's thread, at most a few thousand a second in all.

Every Triton response crosses the Python stub's shared memory and the gRPC stream; one stub
sends roughly 10k responses/s however many streams there are (measured on the H100 machine,
shared/docs/TRITON_NOTES.md), and the sender shares the process's GIL with the decode loop. The
engine only enqueues its outputs; one sender thread sends them, each stream at most once per
interval, several tokens merged into one response (text concatenated, token ids in order). The
interval grows with the number of streams: ``streams / max_responses_per_s``, capped at
``max_interval_s``. One stream gets every token as it comes; 64 streams a response every ~20 ms
each. A stream's first output and its last are sent at once. Plain Python: ``send`` is the
adapter's function.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable

from .engine.request import StepOutput


def merge(outputs: list[StepOutput]) -> StepOutput:
    """Consecutive outputs of one stream as one (an error or a finish ends a stream)."""
    last = outputs[-1]
    return StepOutput(
        text="".join(o.text for o in outputs),
        token_ids=tuple(t for o in outputs for t in o.token_ids),
        finish_reason=last.finish_reason,
        error=last.error,
    )


class ResponseStreamer:
    """streams: how many streams are generating now (the engine's running requests), read per send.
    max_responses_per_s: a budget, not a measured optimum: about a third of what one stub can send
    (~10k/s), so that the sender leaves the GIL to the decode loop most of the time."""

    def __init__(
        self,
        log: Callable[[str], None] = print,
        *,
        streams: Callable[[], int] = lambda: 1,
        max_responses_per_s: float = 3000.0,
        max_interval_s: float = 0.05,
    ):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._log = log
        self._streams, self._rate, self._max_interval = streams, max_responses_per_s, max_interval_s
        self._pending: dict[Callable, list[StepOutput]] = {}  # per stream, in arrival order
        self._last_sent: dict[Callable, float] = {}
        self._thread = threading.Thread(target=self._run, name="response-sender", daemon=True)

    def start(self) -> "ResponseStreamer":
        self._thread.start()
        return self

    def emitter(self, send: Callable[[StepOutput], None]) -> Callable[[StepOutput], None]:
        """The engine-side ``emit`` of one stream: enqueue only."""
        return lambda output: self._queue.put((send, output))

    def stop(self) -> None:
        """Send what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def interval_s(self) -> float:
        return min(self._max_interval, max(self._streams(), 1) / self._rate)

    def _run(self) -> None:
        while True:
            stopping = self._take(timeout=self._next_due())
            self._send_due(everything=stopping)
            if stopping:
                return

    def _take(self, timeout: float | None) -> bool:
        """Move queued outputs to their streams, waiting up to ``timeout`` for the first one;
        True once the stop sentinel is reached."""
        try:
            item = self._queue.get(timeout=timeout)
            while item is not None:  # then everything already waiting, without blocking
                send, output = item
                self._pending.setdefault(send, []).append(output)
                item = self._queue.get_nowait()
            return True
        except queue.Empty:
            return False

    def _next_due(self) -> float | None:
        """Seconds until the earliest waiting stream may send; None: nothing waits."""
        if not self._pending:
            return None
        interval, now = self.interval_s(), time.monotonic()
        return max(0.0, min(self._last_sent.get(send, -math.inf) + interval for send in self._pending) - now)

    def _send_due(self, everything: bool) -> None:
        interval, now = self.interval_s(), time.monotonic()
        for send, outputs in list(self._pending.items()):
            last = outputs[-1]
            ends = last.finish_reason is not None or last.error is not None
            if not (everything or ends or now - self._last_sent.get(send, -math.inf) >= interval):
                continue
            del self._pending[send]
            if ends:
                self._last_sent.pop(send, None)
            else:
                self._last_sent[send] = now
            try:
                send(merge(outputs))
            except Exception as exc:  # one client's failure must not stop the others' streams
                self._log(f"sending a response failed: {exc}")
