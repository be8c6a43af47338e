"""OpenAI Chat Completions requests in, the endpoint's inputs out; the endpoint's responses back
as OpenAI objects. No I/O here."""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass, field


class ChatRequestError(ValueError):
    """A request the endpoint cannot take; the message names the field (HTTP 400)."""


@dataclass
class EndpointRequest:
    prompt: str  # the chat as the endpoint's JSON list of messages
    images: list[bytes]
    parameters: dict
    stream: bool = False
    include_usage: bool = False
    model: str = ""
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


# Passed through as the endpoint's request parameters (ignore_eos: an extension, as in vLLM).
PASSED_THROUGH = ("temperature", "top_p", "seed", "ignore_eos")


def parse_chat_request(body: dict, model: str) -> EndpointRequest:
    if not isinstance(body, dict):
        raise ChatRequestError("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatRequestError("messages must be a non-empty list")
    if body.get("model") not in (None, model):
        raise ChatRequestError(f"model {body.get('model')!r} is not served here; GET /v1/models lists {model!r}")
    if body.get("n", 1) != 1:
        raise ChatRequestError("n must be 1")
    images: list[bytes] = []
    chat = [_message(i, m, images) for i, m in enumerate(messages)]
    parameters = {name: body[name] for name in PASSED_THROUGH if body.get(name) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        parameters["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ChatRequestError("stop must be a string or a list of strings")
        parameters["stop"] = stop
    options = body.get("stream_options") or {}
    return EndpointRequest(
        prompt=json.dumps(chat),
        images=images,
        parameters=parameters,
        stream=bool(body.get("stream", False)),
        include_usage=bool(options.get("include_usage", False)),
        model=model,
    )


def _message(index: int, message: dict, images: list[bytes]) -> dict:
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
        raise ChatRequestError(f"messages[{index}].role must be system, user or assistant")
    content = message.get("content")
    if isinstance(content, str):
        return {"role": message["role"], "content": content}
    if not isinstance(content, list):
        raise ChatRequestError(f"messages[{index}].content must be a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            images.append(_image_bytes(url, f"messages[{index}].content[{j}]"))
            parts.append({"type": "image"})
        else:
            raise ChatRequestError(f"messages[{index}].content[{j}].type must be text or image_url")
    return {"role": message["role"], "content": parts}


def _image_bytes(url: str, where: str) -> bytes:
    """Images come inline as data: URLs. http(s) URLs are refused: fetching them would let any
    caller make this server request any address."""
    if url.startswith(("http://", "https://")):
        raise ChatRequestError(f"{where}: image URLs are not fetched; send the image as a data: URL (base64)")
    header, sep, data = url.partition(",")
    if not (url.startswith("data:") and sep and header.endswith(";base64")):
        raise ChatRequestError(f"{where}: image_url.url must be data:<mime>;base64,<data>")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ChatRequestError(f"{where}: the image's base64 data is corrupt") from None


# --- responses ----------------------------------------------------------------------------------
def chunk(request: EndpointRequest, delta: dict, finish_reason: str | None = None) -> dict:
    return {
        "id": request.request_id,
        "object": "chat.completion.chunk",
        "created": request.created,
        "model": request.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def usage_chunk(request: EndpointRequest, prompt_tokens: int, completion_tokens: int) -> dict:
    return {**chunk(request, {}), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def completion(request: EndpointRequest, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": request.request_id,
        "object": "chat.completion",
        "created": request.created,
        "model": request.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }
