"""The built repository behind a real tritonserver answers as transformers does.

float32, --quant none: greedy token ids must be IDENTICAL to transformers' ``generate`` on the
same weights and inputs, over gRPC streaming and HTTP generate_stream.
"""

from __future__ import annotations

import json

import pytest

from builder.client import stream_generate
from tests.conftest import png
from tests.hf_reference import greedy_tokens, user_turn

pytestmark = [pytest.mark.server, pytest.mark.slow]

MAX_NEW = 12


def generate(server, prompt: str, images=(), protocol: str = "grpc", **params) -> list[dict]:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    parameters = {"max_tokens": MAX_NEW, "temperature": 0, **params}
    return list(stream_generate(url, prompt, list(images), protocol=protocol, parameters=parameters, timeout_s=120))


def tokens(responses: list[dict]) -> list[int]:
    return [t for r in responses for t in r["token_ids"]]


CASES = {
    "image_448": ("Describe this image.", [png(448, 448, seed=1)]),
    "image_224x320": ("What is in the picture?", [png(320, 224, seed=2)]),
    "text_only": ("Write a haiku about GPUs.", []),
    "two_images": ("Compare these images.", [png(256, 256, seed=3), png(192, 320, seed=4)]),
}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_match_transformers(server, tiny_checkpoint, case, protocol):
    prompt, images = CASES[case]
    responses = generate(server, prompt, images, protocol)
    expected = greedy_tokens(tiny_checkpoint, user_turn(prompt, len(images)), images, MAX_NEW)
    assert tokens(responses) == expected
    assert responses[-1]["finish_reason"] in ("length", "stop")
    assert all(r["finish_reason"] == "" for r in responses[:-1])


def test_multi_turn_chat_matches_transformers(server, tiny_checkpoint):
    image = png(384, 288, seed=5)
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A picture of noise."},
        {"role": "user", "content": [{"type": "text", "text": "Which colours dominate?"}]},
    ]
    responses = generate(server, json.dumps(chat), [image])
    assert tokens(responses) == greedy_tokens(tiny_checkpoint, chat, [image], MAX_NEW)


def test_streamed_text_is_the_decoded_tokens(server, tiny_checkpoint):
    from transformers import AutoTokenizer

    responses = generate(server, "Say something.", [png(448, 448, seed=6)])
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert "".join(r["text"] for r in responses) == tokenizer.decode(tokens(responses), skip_special_tokens=True)
    assert responses[0]["prompt_tokens"] == responses[-1]["prompt_tokens"] > 196


def test_concurrent_requests_get_their_own_answers(server, tiny_checkpoint):
    """Requests decoded in one batch answer as each would alone."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(CASES)) as pool:
        futures = {case: pool.submit(generate, server, *CASES[case]) for case in CASES}
        answers = {case: tokens(f.result()) for case, f in futures.items()}
    for case, (prompt, images) in CASES.items():
        assert answers[case] == greedy_tokens(tiny_checkpoint, user_turn(prompt, len(images)), images, MAX_NEW), case


@pytest.fixture(scope="module")
def vision_in_decoder_server(build):
    """The float32 repository built with --vision-backend decoder (the tower in the decoder)."""
    from builder.serve import TritonServer

    repository, _ = build("none", "decoder")
    with TritonServer(repository) as running:
        yield running


def test_vision_in_decoder_answers_as_transformers(vision_in_decoder_server, tiny_checkpoint):
    """Sent together, the requests' images (three sizes, one request with two) are encoded in
    shared engine steps; each answer still equals transformers' for that request alone."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(CASES)) as pool:
        futures = {case: pool.submit(generate, vision_in_decoder_server, *CASES[case]) for case in CASES}
        answers = {case: tokens(f.result()) for case, f in futures.items()}
    for case, (prompt, images) in CASES.items():
        assert answers[case] == greedy_tokens(tiny_checkpoint, user_turn(prompt, len(images)), images, MAX_NEW), case


def test_max_tokens_and_stop_string(server):
    responses = generate(server, "Count.", max_tokens=5)
    assert len(tokens(responses)) == 5 and responses[-1]["finish_reason"] == "length"
    full = "".join(r["text"] for r in generate(server, "Count.", max_tokens=8))
    stop = full[3:6]
    stopped = generate(server, "Count.", max_tokens=8, stop=[stop])
    assert responses[-1]["finish_reason"] == "length"
    assert stopped[-1]["finish_reason"] == "stop"
    assert "".join(r["text"] for r in stopped) == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(server):
    a = tokens(generate(server, "Tell a story.", temperature=1.0, top_p=0.9, top_k=50, seed=7))
    b = tokens(generate(server, "Tell a story.", temperature=1.0, top_p=0.9, top_k=50, seed=7))
    assert a == b
