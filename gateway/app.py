"""The gateway's HTTP API (FastAPI): OpenAI-style chat completions forwarded to Triton over gRPC.

    serve-gateway --triton localhost:8001 --keys keys.json [--tiers-from REPO] [--port 9000]

Every request needs `Authorization: Bearer <key>` (gateway-keys); the key's tier sets the Triton
priority and the `tier` request parameter, so the repository's queues and engine apply it.
Answers stream as server-sent `chat.completion.chunk` events ending with `data: [DONE]`, or come
whole with `usage`. A client that goes away mid-stream cancels the Triton stream (the engine frees
its KV slot). One JSON log line per request: id, tenant, tier, status, tokens, times; never keys
or images.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import math
import sys
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from builder.client import GenerationError, GenerationTimeout, refusal_kind, stream_generate
from model_repository.qwen3vl_runtime.tiers import DEFAULT_TIERS, TierTable

from .breaker import CircuitBreaker
from .cancel import cancel_in_decoder
from .chat import ChatRequestError, EndpointRequest, chunk, completion, parse_chat_request, usage_chunk
from .keys import ApiKey, KeyStore
from .limits import InFlight, KeyLimits, Refusal
from .metrics import GatewayMetrics

MODEL_NAME = "qwen3-vl-2b-instruct"
log = logging.getLogger("qwen3vl.gateway")


class TritonStream:
    """One endpoint call, read in a thread of its own (tritonclient's streaming is blocking) and
    handed to the event loop; cancel() makes the thread leave, which cancels the Triton stream."""

    def __init__(self, triton_url: str, request: EndpointRequest, tier, timeout_s: float):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._triton_url, self._request_id = triton_url, request.request_id
        parameters = {**request.parameters, "tier": tier.name}
        self._responses = stream_generate(
            triton_url,
            request.prompt,
            request.images,
            parameters=parameters,
            priority=tier.priority,
            timeout_s=timeout_s,
            request_id=request.request_id,
        )
        threading.Thread(target=self._read, name="triton-stream", daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self._responses:
                if self._cancelled.is_set():
                    break  # leaving the loop closes the generator: it cancels the Triton stream
                self._loop.call_soon_threadsafe(self._queue.put_nowait, response)
            else:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, None)
                return
            self._responses.close()
            # The ensemble does not pass that cancellation on to the running decoder: name it.
            cancel_in_decoder(self._triton_url, self._request_id)
        except Exception as exc:  # GenerationError and friends: handed to the reader
            self._loop.call_soon_threadsafe(self._queue.put_nowait, exc)

    def cancel(self) -> None:
        self._cancelled.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item


# Error types that mean Triton could not be reached or did not answer: the breaker counts these.
TRITON_FAILURES = ("timeout", "service_unavailable")


def error_status(exc: Exception) -> tuple[int, str]:
    """HTTP status and OpenAI error type of an endpoint error."""
    if isinstance(exc, GenerationTimeout):
        return 504, "timeout"
    kind = refusal_kind(exc)
    if kind == "queue_full":
        return 429, "rate_limit_error"
    if kind == "queue_timeout":
        return 503, "server_overloaded"
    if kind == "unreachable":
        return 503, "service_unavailable"
    return 400, "invalid_request_error"


def create_app(
    triton_url: str,
    keys: KeyStore,
    tiers: TierTable = DEFAULT_TIERS,
    *,
    timeout_s: float = 300.0,
    breaker: CircuitBreaker | None = None,
) -> FastAPI:
    app = FastAPI(title="qwen3vl gateway")
    breaker = breaker or CircuitBreaker()
    metrics = GatewayMetrics()
    finish = functools.partial(_finish, metrics)
    buckets: dict[str, KeyLimits] = {}
    in_flight = InFlight({t.name: t.max_concurrent + t.max_queue for t in tiers.tiers})

    def error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)

    def authenticate(request: Request) -> ApiKey | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return keys.verify(token.strip()) if scheme.lower() == "bearer" and token else None

    @app.get("/metrics")
    async def prometheus():
        from fastapi.responses import Response

        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        import tritonclient.grpc as grpcclient

        try:
            client = grpcclient.InferenceServerClient(triton_url)
            ok = await asyncio.to_thread(client.is_model_ready, "qwen3_vl")
        except Exception:
            ok = False
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        if authenticate(request) is None:
            return error(401, "invalid or missing API key", "invalid_request_error")
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "qwen3vl-triton"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.monotonic()
        key = authenticate(request)
        if key is None:
            finish({"tenant": None, "tier": None}, status=401, started=started)
            return error(401, "invalid or missing API key", "invalid_request_error")
        record = {"tenant": key.tenant, "tier": key.tier}
        try:
            body = await request.json()
            chat = parse_chat_request(body, MODEL_NAME)
            tier = tiers.get(key.tier)
        except (ChatRequestError, ValueError) as exc:
            finish(record, status=400, started=started)
            return error(400, str(exc), "invalid_request_error")
        record["request_id"] = chat.request_id
        limits = buckets.setdefault(key.key_id, KeyLimits(key.requests_per_minute, key.tokens_per_minute))
        refusal = limits.admit()
        if refusal is None and not in_flight.enter(tier.name):
            refusal = Refusal(f"the {tier.name} tier has {in_flight.caps[tier.name]} requests in flight", 1.0, "tier_in_flight")
        if refusal is not None:
            finish(record, status=429, started=started, limit=refusal.limit)
            retry = {"Retry-After": str(max(1, math.ceil(refusal.retry_after_s)))}
            return error(429, f"{refusal.reason}; retry later", "rate_limit_error", retry)
        wait = breaker.allow()
        if wait:
            in_flight.leave(tier.name)
            finish(record, status=503, started=started)
            retry = {"Retry-After": str(max(1, math.ceil(wait)))}
            return error(503, "Triton is unavailable (circuit open); retry later", "service_unavailable", retry)

        def done(tokens: int, failure: Exception | None = None) -> None:  # once per admitted request
            in_flight.leave(tier.name)
            limits.generated(tokens)
            if failure is not None and error_status(failure)[1] in TRITON_FAILURES:
                breaker.failure()
            else:
                breaker.success()  # Triton answered, even if it refused the request

        stream = TritonStream(triton_url, chat, tier, timeout_s)
        if chat.stream:
            return StreamingResponse(_sse(chat, stream, record, started, request, done, finish), media_type="text/event-stream")
        text, finish_reason, prompt_tokens, tokens, failure = [], "stop", 0, 0, None
        try:
            async for response in stream:
                record.setdefault("ttft_ms", round((time.monotonic() - started) * 1e3, 1))
                text.append(response["text"])
                tokens += len(response["token_ids"])
                prompt_tokens = response["prompt_tokens"] or prompt_tokens
                finish_reason = response["finish_reason"] or finish_reason
        except (GenerationError, GenerationTimeout) as exc:
            failure = exc
            status, kind = error_status(exc)
            finish(record, status=status, started=started, completion_tokens=tokens)
            return error(status, str(exc), kind, {"Retry-After": "1"} if status in (429, 503) else None)
        finally:
            stream.cancel()
            done(tokens, failure)
        finish(record, status=200, started=started, prompt_tokens=prompt_tokens, completion_tokens=tokens)
        return completion(chat, "".join(text), finish_reason, prompt_tokens, tokens)

    return app


async def _sse(chat: EndpointRequest, stream: TritonStream, record: dict, started: float, request: Request, done, finish):
    """Server-sent events of one streamed answer; an error after the first byte is an error event.

    The client's going away is polled before each event: Starlette (1.x, ASGI 2.4) only notices it
    when a write fails and then leaves this generator to the garbage collector, which would keep
    the Triton stream generating for nobody until then."""

    def event(payload) -> str:
        return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"

    prompt_tokens, tokens, status, failure = 0, 0, 200, None
    try:
        yield event(chunk(chat, {"role": "assistant", "content": ""}))
        async for response in stream:
            if await request.is_disconnected():
                status = 499
                return
            record.setdefault("ttft_ms", round((time.monotonic() - started) * 1e3, 1))
            tokens += len(response["token_ids"])
            prompt_tokens = response["prompt_tokens"] or prompt_tokens
            if response["text"]:
                yield event(chunk(chat, {"content": response["text"]}))
            if response["finish_reason"]:
                yield event(chunk(chat, {}, response["finish_reason"]))
        if chat.include_usage:
            yield event(usage_chunk(chat, prompt_tokens, tokens))
        yield event("[DONE]")
    except (GenerationError, GenerationTimeout) as exc:
        failure = exc
        status, kind = error_status(exc)
        yield event({"error": {"message": str(exc), "type": kind}})
    except (asyncio.CancelledError, GeneratorExit):  # the client went away
        status = 499
        raise
    finally:
        stream.cancel()  # when it did not end by itself: stop generating for nobody
        done(tokens, failure)
        finish(record, status=status, started=started, prompt_tokens=prompt_tokens, completion_tokens=tokens)


def _finish(metrics: GatewayMetrics, record: dict, *, status: int, started: float, **counts) -> None:
    """The request's one log line, and its metrics."""
    record.update(status=status, **counts, duration_ms=round((time.monotonic() - started) * 1e3, 1))
    log.info(json.dumps(record))
    metrics.observe(record)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="serve-gateway", description=__doc__.split("\n\n")[0])
    p.add_argument("--triton", default="localhost:8001", help="Triton's gRPC address")
    p.add_argument("--keys", type=Path, default=Path("keys.json"), help="the key store of gateway-keys")
    p.add_argument("--tiers-from", type=Path, help="a repository whose manifest gives the tiers (default: vip/standard/free)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    args = p.parse_args(argv)
    import uvicorn

    tiers = DEFAULT_TIERS
    if args.tiers_from:
        manifest = json.loads((args.tiers_from / "manifest.json").read_text())
        tiers = TierTable.from_json(json.dumps(manifest["options"]["tiers"]))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    uvicorn.run(create_app(args.triton, KeyStore(args.keys), tiers), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
