"""Responses leave the engine's thread and coalesce when sending falls behind."""

from __future__ import annotations

import threading
import time

from model_repository.qwen3vl_runtime.engine import StepOutput
from model_repository.qwen3vl_runtime.streaming import ResponseStreamer, merge


def test_outputs_waiting_for_a_slow_send_go_out_as_one_response():
    sent, entered, release = [], threading.Event(), threading.Event()

    def send(output):  # the first send blocks until the test has queued more behind it
        sent.append(output)
        entered.set()
        release.wait(10)

    streamer = ResponseStreamer().start()
    emit = streamer.emitter(send)
    emit(StepOutput("Hel", (1,)))
    assert entered.wait(10)
    emit(StepOutput("lo", (2,)))
    emit(StepOutput(" world", (3, 4), finish_reason="length"))
    release.set()
    streamer.stop()
    assert sent == [StepOutput("Hel", (1,)), StepOutput("lo world", (2, 3, 4), finish_reason="length")]


def test_streams_are_kept_apart_and_a_failing_client_does_not_stop_others():
    got = {"a": [], "b": []}
    streamer = ResponseStreamer(log=lambda message: None).start()

    def broken(output):
        raise RuntimeError("client went away")

    emit_a, emit_b, emit_c = streamer.emitter(got["a"].append), streamer.emitter(got["b"].append), streamer.emitter(broken)
    for i in range(5):
        emit_a(StepOutput(f"a{i}", (i,)))
        emit_c(StepOutput("x", (9,)))
        emit_b(StepOutput(f"b{i}", (10 + i,)))
    emit_a(StepOutput("", (), finish_reason="stop"))
    emit_b(StepOutput("", (), error="boom"))
    streamer.stop()
    a, b = merge(got["a"]), merge(got["b"])
    assert a == StepOutput("a0a1a2a3a4", (0, 1, 2, 3, 4), finish_reason="stop")
    assert b == StepOutput("b0b1b2b3b4", (10, 11, 12, 13, 14), error="boom")
    assert got["a"][-1].finish_reason == "stop" and all(o.finish_reason is None for o in got["a"][:-1])


def test_many_streams_get_fewer_larger_responses_and_ends_go_out_at_once():
    """64 streams at 320 responses/s: each stream sends at most every 0.2 s; its first output and
    its last are not held back."""
    sent = []
    streamer = ResponseStreamer(streams=lambda: 64, max_responses_per_s=320, max_interval_s=1.0).start()
    emit = streamer.emitter(sent.append)
    emit(StepOutput("a", (1,)))
    time.sleep(0.02)
    for i in range(2, 6):
        emit(StepOutput("b", (i,)))
    time.sleep(0.1)
    assert sent == [StepOutput("a", (1,))]  # the other four wait for the stream's interval
    time.sleep(0.2)
    assert sent[1:] == [StepOutput("bbbb", (2, 3, 4, 5))]
    emit(StepOutput("c", (6,)))
    emit(StepOutput("", (), finish_reason="stop"))
    time.sleep(0.05)  # well before the interval: the finish takes what waits with it
    assert sent[2:] == [StepOutput("c", (6,), finish_reason="stop")]
    streamer.stop()


def test_one_stream_gets_every_output_as_it_comes():
    sent = []
    streamer = ResponseStreamer(streams=lambda: 1).start()  # 1 / 3000 s: below a decode step
    emit = streamer.emitter(sent.append)
    for i in range(5):
        emit(StepOutput(str(i), (i,)))
        time.sleep(0.01)
    streamer.stop()
    assert sent == [StepOutput(str(i), (i,)) for i in range(5)]
