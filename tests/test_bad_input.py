"""Bad input gets a clear error naming the problem, and the server keeps serving."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from builder.client import GenerationError, stream_generate
from tests.conftest import png

pytestmark = [pytest.mark.server, pytest.mark.slow]


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def gif() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="GIF")
    return buffer.getvalue()


def ask(server, prompt="Describe this image.", images=(), **params) -> list[dict]:
    parameters = {"max_tokens": 4, "temperature": 0, **params}
    return list(stream_generate(server.grpc_url, prompt, list(images), parameters=parameters, timeout_s=60))


def assert_still_serving(server):
    responses = ask(server, images=[png(64, 64)])
    assert responses[-1]["finish_reason"] == "length"


BAD_IMAGES = {
    "corrupt": (b"\x89PNG\r\n\x1a\n this is not a png", "not a PNG, JPEG or WebP image"),
    "truncated": (png(256, 256)[:400], "corrupt or truncated PNG"),
    "unsupported_format": (gif(), "format GIF is not supported"),
    "zero_pixels": (png_header(0, 16), "has no pixels"),
    "decompression_bomb": (png_header(30000, 30000), "decompression bomb"),
    "over_source_limit": (png_header(10000, 8000), "over this server's limit"),
    "empty": (b"", "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_is_named_and_server_survives(server, case):
    data, message = BAD_IMAGES[case]
    with pytest.raises(GenerationError, match=message):
        ask(server, images=[png(64, 64), data])
    assert_still_serving(server)


def test_large_image_is_resized_not_rejected(server):
    # 2000x1500 is over the build's max_pixels (1 MP): resized down to at most 1,024 image tokens.
    responses = ask(server, images=[png(2000, 1500)])
    assert 900 < responses[0]["prompt_tokens"] <= 1024 + 32


@pytest.mark.parametrize(
    "params, message",
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": -3}, "max_tokens must be an integer >= 1"),
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"stop": "[1, 2]"}, "stop must be"),
    ],
)
def test_bad_sampling_parameters(server, params, message):
    with pytest.raises(GenerationError, match=message):
        ask(server, **params)
    assert_still_serving(server)


def test_prompt_over_max_context(server):
    with pytest.raises(GenerationError, match=r"the prompt is \d+ tokens .*max context is 1024"):
        ask(server, "hello " * 2000)
    assert_still_serving(server)


def test_chat_with_wrong_image_count(server):
    chat = '[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]'
    with pytest.raises(GenerationError, match=r"1 image part\(s\) but the request sent 0"):
        ask(server, chat)


def raw_infer(server, inputs):
    """A raw tritonclient stream, as a client that ignores our contract would send."""
    import queue

    results = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("qwen3_vl", inputs)
        return results.get(timeout=60)
    finally:
        client.stop_stream()
        client.close()


def test_wrong_tensor_type_is_rejected_by_triton(server):
    prompt = grpcclient.InferInput("prompt", [1], "INT32")
    prompt.set_data_from_numpy(np.array([3], dtype=np.int32))
    _, error = raw_infer(server, [prompt])
    assert "input 'prompt' data-type is 'INT32', but model 'qwen3_vl' expects 'BYTES'" in str(error)
    assert_still_serving(server)


def test_wrong_tensor_shape_is_rejected(server):
    prompt = grpcclient.InferInput("prompt", [2], "BYTES")
    prompt.set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_))
    _, error = raw_infer(server, [prompt])
    assert "unexpected shape for input 'prompt'" in str(error) and "Expected [1], got [2]" in str(error)
    assert_still_serving(server)
