"""The OpenAI-style gateway against a real tritonserver, driven by the official openai SDK."""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import uvicorn

from builder.client import stream_generate
from gateway.app import MODEL_NAME, create_app
from gateway.keys import KeyStore, main as gateway_keys

from .conftest import png

pytestmark = [pytest.mark.server, pytest.mark.slow]
GREEDY = {"temperature": 0, "max_tokens": 8}
PUBLISH_S = 0.6  # the engine publishes its Prometheus metrics every 0.5 s


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    """(base URL, keys by name, key store) of a gateway on a free port in front of `server`."""
    store = KeyStore(tmp_path_factory.mktemp("gateway") / "keys.json")
    keys = {name: store.create(f"tenant-{name}", tier)[0] for name, tier in (("vip", "vip"), ("free", "free"))}
    revoked, record = store.create("tenant-gone", "standard")
    store.revoke(record.key_id)
    keys["revoked"] = revoked
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(server.grpc_url, store), host="127.0.0.1", port=port, log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not running.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", keys, store
    running.should_exit = True
    thread.join(timeout=10)


def client(gateway, key="vip") -> openai.OpenAI:
    base_url, keys, _ = gateway
    return openai.OpenAI(base_url=base_url, api_key=keys.get(key, key), max_retries=0)


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def image_question(image: bytes, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": text}]}


def test_text_answer_is_the_endpoints_answer(gateway, server):
    messages = [{"role": "user", "content": "Say something."}]
    answer = client(gateway).chat.completions.create(model=MODEL_NAME, messages=messages, **GREEDY)
    direct = stream_generate(server.grpc_url, json.dumps(messages), parameters={**GREEDY, "tier": "vip"}, priority=1)
    assert answer.choices[0].message.content == "".join(r["text"] for r in direct)
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 8 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 8


def test_streamed_image_chat_with_usage_equals_the_whole_answer(gateway):
    image = png(320, 224, seed=3)
    messages = [
        {"role": "system", "content": "You are brief."},
        image_question(image, "What is this?"),
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": [{"type": "text", "text": "And its colours?"}]},
    ]
    whole = client(gateway).chat.completions.create(model=MODEL_NAME, messages=messages, **GREEDY)
    chunks = list(
        client(gateway).chat.completions.create(
            model=MODEL_NAME, messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 64  # the image's tokens count


def test_models_lists_the_one_model(gateway):
    assert [m.id for m in client(gateway).models.list()] == [MODEL_NAME]


@pytest.mark.parametrize("key", ["qv-00000000-not-a-key", "revoked"])
def test_wrong_or_revoked_key_is_401_without_hints(gateway, key):
    with pytest.raises(openai.AuthenticationError) as caught:
        client(gateway, key).chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.status_code == 401
    assert "invalid or missing API key" in str(caught.value)


def test_missing_key_is_401(gateway):
    body = json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]}).encode()
    request = urllib.request.Request(f"{gateway[0]}/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 401 and "invalid or missing API key" in caught.value.read().decode()


def test_bad_requests_are_400_naming_the_problem(gateway):
    cases = {
        "image URLs are not fetched": [image_question(b"", "x")],
        "base64 data is corrupt": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
        "messages[0].role": [{"role": "robot", "content": "x"}],
        "not a PNG, JPEG or WebP image": [image_question(b"not an image at all", "x")],
    }
    cases["image URLs are not fetched"][0]["content"][0]["image_url"]["url"] = "https://example.com/cat.png"
    for expected, messages in cases.items():
        with pytest.raises(openai.BadRequestError) as caught:
            client(gateway).chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2)
        assert expected.lower() in str(caught.value).lower(), (expected, str(caught.value))


def _abandon_a_long_stream(gateway) -> None:
    stream = client(gateway).chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=600,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    iterator = iter(stream)
    next(iterator), next(iterator)
    stream.close()


def test_client_disconnect_ends_the_gateways_triton_stream(gateway, caplog):
    with caplog.at_level(logging.INFO, logger="qwen3vl.gateway"):
        _abandon_a_long_stream(gateway)
        deadline = time.monotonic() + 10
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.05)
    line = json.loads(caplog.records[-1].getMessage())
    assert line["status"] == 499 and line["completion_tokens"] < 600 and line["tenant"] == "tenant-vip"
    assert "qv-" not in caplog.text  # never a key in the logs


def test_client_disconnect_frees_the_engines_kv_slot(gateway, server):
    """The ensemble does not pass the cancellation on; the gateway names the request to the decoder,
    whose engine counts it cancelled and frees its slot long before its 600 tokens are done."""

    def engine_metric(name: str) -> float:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        return sum(float(v) for v in re.findall(rf"^qwen3vl_{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE))

    def idle() -> bool:
        return engine_metric("kv_slots_used") == 0 and engine_metric("running_requests") == 0

    def wait_for(condition, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.1)

    def settled() -> bool:  # two publishes apart, the same count: nothing still landing
        first = engine_metric("cancelled_total")
        time.sleep(PUBLISH_S)
        return engine_metric("cancelled_total") == first

    wait_for(idle, 30)  # an earlier test's abandoned stream ends first
    wait_for(settled, 10)
    before, tokens_before = engine_metric("cancelled_total"), engine_metric("generated_tokens_total")
    _abandon_a_long_stream(gateway)
    wait_for(lambda: engine_metric("cancelled_total") > before, 5)
    time.sleep(PUBLISH_S)  # the gauges of a publish after the cancellation
    assert engine_metric("cancelled_total") == before + 1 and idle()
    assert engine_metric("generated_tokens_total") - tokens_before < 600


def test_keys_cli_shows_a_key_once_and_lists_and_revokes_without_it(tmp_path, capsys):
    store = tmp_path / "keys.json"
    assert gateway_keys(["--file", str(store), "create", "--tenant", "acme", "--tier", "vip"]) == 0
    key = capsys.readouterr().out.split()[0]
    assert key.startswith("qv-") and key not in store.read_text()  # only its SHA-256 is stored
    record = KeyStore(store).verify(key)
    assert (record.tenant, record.tier) == ("acme", "vip")
    assert gateway_keys(["--file", str(store), "list"]) == 0
    listing = capsys.readouterr().out
    assert record.key_id in listing and "acme" in listing and key not in listing
    assert gateway_keys(["--file", str(store), "revoke", record.key_id]) == 0
    assert KeyStore(store).verify(key) is None
    assert gateway_keys(["--file", str(store), "revoke", "nope"]) == 2
