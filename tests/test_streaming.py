"""Responses leave the engine's thread and coalesce when sending falls behind."""

from __future__ import annotations

import threading

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
