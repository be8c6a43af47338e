"""Streamed responses sent off the engine's thread, coalesced when sending falls behind.

Every Triton response crosses the Python stub's shared memory and the gRPC stream; one stub
sends roughly 10k responses/s however many streams there are (measured on the H100 machine,
shared/docs/TRITON_NOTES.md). The engine only enqueues its
outputs; one sender thread drains the queue, and when several outputs of a stream are waiting
it sends them as one response (text concatenated, token ids in order). A small batch therefore
streams every token as it comes, a large one streams several tokens per response, and the
decode loop never waits on a send. Plain Python: ``send`` is the adapter's function.
"""

from __future__ import annotations

import queue
import threading
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
    def __init__(self, log: Callable[[str], None] = print):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._log = log
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

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while True:  # take everything already waiting, without blocking
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._send_all(batch)
                    return
                batch.append(item)
            self._send_all(batch)

    def _send_all(self, batch) -> None:
        by_stream: dict[Callable, list[StepOutput]] = {}
        for send, output in batch:  # dicts keep insertion order: streams in arrival order
            by_stream.setdefault(send, []).append(output)
        for send, outputs in by_stream.items():
            try:
                send(merge(outputs))
            except Exception as exc:  # one client's failure must not stop the others' streams
                self._log(f"sending a response failed: {exc}")
