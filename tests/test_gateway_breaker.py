"""The gateway's circuit breaker: its states on a fake clock, then a real tritonserver (the echo
repository) stopped and started again behind a real gateway."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import openai
import pytest
import uvicorn

from builder.serve import TritonServer
from builder.server_setup import free_ports
from gateway.app import MODEL_NAME, create_app
from gateway.breaker import CircuitBreaker
from gateway.keys import KeyStore

from .conftest import FakeClock

ECHO_REPO = Path(__file__).parent / "data" / "echo_repo"


def test_opens_after_failures_probes_once_and_closes_on_success():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=10, clock=clock)
    breaker.failure()
    assert breaker.allow() == 0 and breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and breaker.allow() == pytest.approx(10)
    clock.now = 10
    assert breaker.allow() == 0 and breaker.state == "half-open"  # the probe
    assert breaker.allow() > 0  # only one probe at a time
    breaker.failure()  # the probe failed: open again, for another reset period
    assert breaker.state == "open" and breaker.allow() == pytest.approx(10)
    clock.now = 20
    assert breaker.allow() == 0
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() == 0


@pytest.mark.server
def test_opens_when_triton_stops_and_closes_when_it_returns(tmp_path):
    ports = dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3)))
    store = KeyStore(tmp_path / "keys.json")
    key, _ = store.create("acme", "vip")
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=1.0)
    app = create_app(f"127.0.0.1:{ports['grpc_port']}", store, breaker=breaker, timeout_s=10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gateway = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=gateway.run, daemon=True).start()
    while not gateway.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    hello = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello there"}]}
    try:
        with TritonServer(ECHO_REPO, **ports):
            assert client.chat.completions.create(**hello).choices[0].message.content
        for _ in range(2):  # Triton is gone: two failures open the circuit
            with pytest.raises(openai.InternalServerError) as caught:
                client.chat.completions.create(**hello)
            assert caught.value.status_code == 503 and "circuit" not in str(caught.value)
        assert breaker.state == "open"
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError, match="circuit open"):
            client.chat.completions.create(**hello)
        assert time.monotonic() - started < 0.5  # failed fast, no round trip
        with TritonServer(ECHO_REPO, **ports):
            time.sleep(1.0)  # the reset period: the next request is the probe
            assert client.chat.completions.create(**hello).choices[0].message.content
            assert breaker.state == "closed"
    finally:
        gateway.should_exit = True
