"""The gateway's admission limits: token buckets per key (fake clock) and in-flight caps per tier,
then both through the HTTP API with the openai SDK."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import openai
import pytest
import uvicorn

from gateway.app import MODEL_NAME, create_app
from gateway.keys import KeyStore
from gateway.limits import InFlight, KeyLimits
from model_repository.qwen3vl_runtime.tiers import DEFAULT_TIERS, Tier, TierTable

from .conftest import FakeClock



def test_request_bucket_refills_and_says_how_long_to_wait():
    clock = FakeClock()
    limits = KeyLimits(requests_per_minute=2, tokens_per_minute=1000, clock=clock)
    assert limits.admit() is None and limits.admit() is None
    refusal = limits.admit()
    assert refusal.reason == "request rate limit reached" and refusal.retry_after_s == pytest.approx(30)
    clock.now = 30
    assert limits.admit() is None


def test_generated_tokens_overdraw_and_block_until_refilled():
    clock = FakeClock()
    limits = KeyLimits(requests_per_minute=100, tokens_per_minute=60, clock=clock)  # one token a second
    assert limits.admit() is None
    limits.generated(90)  # one long answer: 30 tokens overdrawn
    refusal = limits.admit()
    assert refusal.reason == "generated-token rate limit reached" and refusal.retry_after_s == pytest.approx(31)
    clock.now = 31
    assert limits.admit() is None


def test_in_flight_cap_per_tier():
    flight = InFlight({"vip": 2, "free": 1})
    assert flight.enter("free") and not flight.enter("free") and flight.enter("vip")
    flight.leave("free")
    assert flight.enter("free")


@pytest.fixture(scope="module")
def strict_gateway(server, tmp_path_factory):
    """A gateway whose vip tier holds one request in flight, and keys with small buckets."""
    store = KeyStore(tmp_path_factory.mktemp("limits") / "keys.json")
    keys = {
        "two_a_minute": store.create("slow", "standard", requests_per_minute=2)[0],
        "few_tokens": store.create("terse", "standard", tokens_per_minute=5)[0],
        "vip": store.create("one-at-a-time", "vip")[0],
    }
    vip = DEFAULT_TIERS.get("vip")
    tiers = TierTable(
        tuple(Tier(t.name, t.priority, 1, t.queue_timeout_s, 0, t.max_tokens) if t is vip else t for t in DEFAULT_TIERS.tiers),
        default=DEFAULT_TIERS.get(None).name,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    running = uvicorn.Server(uvicorn.Config(create_app(server.grpc_url, store, tiers), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    while not running.started:
        time.sleep(0.05)
    clients = {name: openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0) for name, key in keys.items()}
    yield clients, f"http://127.0.0.1:{port}"
    running.should_exit = True
    thread.join(timeout=10)


HI = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


@pytest.mark.server
def test_429_with_retry_after_when_a_bucket_is_empty(strict_gateway):
    clients, base = strict_gateway
    client = clients["two_a_minute"]
    client.chat.completions.create(**HI)
    client.chat.completions.create(**HI)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**HI)
    assert caught.value.status_code == 429 and "request rate limit" in str(caught.value)
    assert int(caught.value.response.headers["retry-after"]) == 30

    terse = clients["few_tokens"]
    terse.chat.completions.create(**HI)  # 4 tokens of 5: still admitted once more
    terse.chat.completions.create(**HI)  # now overdrawn
    with pytest.raises(openai.RateLimitError, match="generated-token rate limit"):
        terse.chat.completions.create(**HI)

    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    assert 'qwen3vl_gateway_rate_limited_total{limit="requests",tier="standard"} 1.0' in metrics
    assert 'qwen3vl_gateway_rate_limited_total{limit="tokens",tier="standard"} 1.0' in metrics
    assert 'qwen3vl_gateway_requests_total{status="200",tier="standard"} 4.0' in metrics
    assert 'qwen3vl_gateway_generated_tokens_total{tier="standard"} 16.0' in metrics
    assert 'qwen3vl_gateway_time_to_first_token_seconds_count{tier="standard"} 4.0' in metrics
    assert "tenant" not in metrics and "qv-" not in metrics  # labels by tier, never by key


@pytest.mark.server
def test_tier_cap_holds_in_flight(strict_gateway):
    client = strict_gateway[0]["vip"]
    first = client.chat.completions.create(**{**HI, "max_tokens": 120}, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(first)
    next(chunks)  # the first request is in flight
    with pytest.raises(openai.RateLimitError, match="the vip tier has 1 requests in flight"):
        client.chat.completions.create(**HI)
    assert sum(1 for _ in chunks) > 0  # read it to the end: it leaves
    assert client.chat.completions.create(**HI).usage.completion_tokens == 4
