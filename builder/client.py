"""Stream a generation from a repository's ensemble over gRPC or HTTP: a library call and `ask-repo`.

Both protocols give the same dicts: {"text", "token_ids", "finish_reason", "prompt_tokens"}, one per
streamed response. gRPC uses a bidirectional stream (one per call: tritonclient drops the request
id from error responses, so errors of requests sharing a stream cannot be told apart); HTTP uses
Triton's `generate_stream` (server-sent events), which carries JSON only, so images go as base64.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import queue
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from model_repository.qwen3vl_runtime.specs import ENSEMBLE


class GenerationError(RuntimeError):
    """The server answered with an error (the message is the server's) or could not be reached."""


class GenerationTimeout(GenerationError, TimeoutError):
    """No complete answer within the call's timeout."""


def refusal_kind(error: GenerationError) -> str | None:
    """Why the server did not serve a request, from its message: "queue_full" (a tier's queue, the
    engine's or Triton's "Exceeds maximum queue size"), "queue_timeout" (waited past the tier's
    timeout: the engine's "timed out", Triton's "Request timeout expired"), "unreachable", or None
    (the request itself was wrong)."""
    message = str(error)
    if "queue is full" in message or "Exceeds" in message:
        return "queue_full"
    if "timed out" in message or "timeout expired" in message:
        return "queue_timeout"
    lowered = message.lower()
    if "cannot reach" in lowered or "failed to connect" in lowered or "unavailable" in lowered:
        return "unreachable"
    return None


def stream_generate(
    url: str,
    prompt: str,
    images: Iterable[bytes] = (),
    *,
    protocol: str = "grpc",
    parameters: dict | None = None,
    priority: int = 0,
    timeout_s: float = 60.0,
    model: str = ENSEMBLE,
    request_id: str = "",
) -> Iterator[dict]:
    """Yield each streamed response of `model` as {"text", "token_ids", "finish_reason", "prompt_tokens"}.

    url: "host:port" (an http:// prefix is accepted). images: encoded image files (PNG, JPEG, WebP).
    parameters: request parameters such as max_tokens, temperature, top_p, top_k, seed, stop; a
    list or dict value (stop=["\\n"]) is sent as a JSON string. priority: Triton priority level
    (1 = highest, 0 = the model's default); HTTP's generate endpoint has no priority field, so
    over HTTP it travels as a request parameter named "priority", which the models may read but
    Triton's queues do not. timeout_s bounds the whole call. Raises GenerationError with the
    server's message on an error response, GenerationTimeout when time runs out. request_id
    (gRPC): the id the server knows the request by (what a later cancel names).
    """
    wire = {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else v for k, v in (parameters or {}).items()}
    images = [bytes(i) for i in images]
    if protocol == "grpc":
        return _grpc_stream(url, model, prompt, images, wire, priority, timeout_s, request_id)
    if protocol == "http":
        if priority:
            wire["priority"] = priority
        return _http_stream(url, model, prompt, images, wire, timeout_s)
    raise ValueError(f"protocol must be 'grpc' or 'http', not {protocol!r}")


def _host_port(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def _normalize(text, token_ids, finish_reason, prompt_tokens) -> dict:
    """One response as plain Python values; any output a response lacks gets an empty value."""
    if isinstance(token_ids, (int, np.integer)):  # generate_stream renders one-element arrays as scalars
        token_ids = [token_ids]
    return {
        "text": text or "",
        "token_ids": [int(t) for t in (token_ids if token_ids is not None else [])],
        "finish_reason": finish_reason or "",
        "prompt_tokens": int(prompt_tokens) if prompt_tokens is not None else 0,
    }


# --- gRPC ---------------------------------------------------------------------------------------
def _grpc_stream(url, model, prompt, images, parameters, priority, timeout_s, request_id="") -> Iterator[dict]:
    import tritonclient.grpc as grpcclient  # noqa: PLC0415 - HTTP-only users need not load gRPC
    from tritonclient.utils import InferenceServerException  # noqa: PLC0415

    inputs = [grpcclient.InferInput("prompt", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=np.object_))
    if images:  # the ensemble's images input is optional: no images, no tensor
        tensor = grpcclient.InferInput("images", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
        inputs.append(tensor)

    deadline = time.monotonic() + timeout_s
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(_host_port(url))
    finished = False
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)), stream_timeout=timeout_s)
        # The empty final response marks the end; after an error response none comes (seen on 2.51).
        try:
            client.async_stream_infer(
                model,
                inputs,
                request_id=request_id,
                parameters=parameters or None,
                priority=priority,
                enable_empty_final_response=True,
            )
        except InferenceServerException as err:
            # A stream that failed at once (no server there) reports why through the callback;
            # prefer that message, which the exception raised here only points to.
            try:
                _, error = responses.get(timeout=1.0)
            except queue.Empty:
                error = None
            finished = True
            raise GenerationError(error.message() if error is not None else err.message()) from None
        while True:
            try:
                result, error = responses.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise GenerationTimeout(f"no complete answer from {url} within {timeout_s} s") from None
            if error is not None:
                finished = True
                message = error.message()
                if "deadline" in message.lower():
                    raise GenerationTimeout(f"no complete answer from {url} within {timeout_s} s: {message}")
                raise GenerationError(message)
            response = result.get_response()
            if response.outputs:  # the empty final response has none
                yield _grpc_response(result)
            if response.parameters["triton_final_response"].bool_param:
                finished = True
                return
    finally:
        # Leaving early (an error, a timeout, a consumer that stops reading) cancels the request so
        # the server frees its resources instead of generating for nobody.
        client.stop_stream(cancel_requests=not finished)
        client.close()


def _grpc_response(result) -> dict:
    def first(name):
        array = result.as_numpy(name)
        if array is None or array.size == 0:
            return None
        value = array.reshape(-1)[0]
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value

    token_ids = result.as_numpy("token_ids")
    return _normalize(
        first("text"), None if token_ids is None else token_ids.reshape(-1).tolist(), first("finish_reason"), first("prompt_tokens")
    )


# --- HTTP (server-sent events) -------------------------------------------------------------------
def _http_stream(url, model, prompt, images, parameters, timeout_s) -> Iterator[dict]:
    body = {"prompt": prompt}
    if images:
        body["images"] = [base64.b64encode(i).decode("ascii") for i in images]
    if parameters:
        body["parameters"] = parameters
    deadline = time.monotonic() + timeout_s
    too_late = f"no complete answer from {url} within {timeout_s} s"
    connection = http.client.HTTPConnection(_host_port(url), timeout=timeout_s)
    try:
        try:
            connection.request(
                "POST",
                f"/v2/models/{model}/generate_stream",
                body=json.dumps(body).encode("utf-8"),
                headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
            )
            sock = connection.sock  # held here: getresponse() drops it from a connection that will close
            reply = connection.getresponse()
        except TimeoutError:
            raise GenerationTimeout(too_late) from None
        except OSError as err:
            raise GenerationError(f"cannot reach {url}: {err}") from None
        if reply.status != 200:  # an error before the first response comes as HTTP 400
            raise GenerationError(_http_error_message(reply.read().decode("utf-8", errors="replace")))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GenerationTimeout(too_late)
            sock.settimeout(remaining)  # each read waits at most until the deadline
            try:
                line = reply.readline()
            except TimeoutError:
                raise GenerationTimeout(too_late) from None
            if not line:
                return  # the server ends the stream after the final response
            line = line.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue  # blank separators between events
            event = json.loads(line[len("data:"):])
            if "error" in event:  # an error after the first response comes as an event
                raise GenerationError(event["error"])
            yield _normalize(event.get("text"), event.get("token_ids"), event.get("finish_reason"), event.get("prompt_tokens"))
    finally:
        connection.close()  # also what tells the server that a reader who left early is gone


def _http_error_message(body: str) -> str:
    """The server's message from an error body: SSE `data: {"error": ...}` or plain JSON."""
    for line in body.splitlines():
        line = line.strip()
        if line.startswith("data:"):
            line = line[len("data:"):]
        try:
            return json.loads(line)["error"]
        except (ValueError, KeyError, TypeError):
            continue
    return body.strip() or "the server answered with an HTTP error"


# --- ask-repo ------------------------------------------------------------------------------------
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ask-repo", description="Ask a served Qwen3-VL repository, streaming the answer.")
    p.add_argument("--url", required=True, help="HOST:PORT of the server's gRPC or HTTP endpoint")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file; repeat for several")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", metavar="S", help="a stop string; repeat for several")
    p.add_argument("--priority", type=int, default=0, help="1 = highest; 0 = the server's default")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole answer")
    p.add_argument("--model", default=ENSEMBLE)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`ask-repo`: print the answer as it streams, then a line with the finish reason and counts."""
    args = _parse_args(argv)
    sampling = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
    }
    try:
        images = [Path(path).read_bytes() for path in args.image]
    except OSError as err:
        print(f"ask-repo: cannot read image: {err}", file=sys.stderr)
        return 2
    start = time.monotonic()
    first_token_s = None
    finish, prompt_tokens, generated = "", 0, 0
    try:
        for response in stream_generate(
            args.url,
            args.prompt,
            images,
            protocol=args.protocol,
            parameters={k: v for k, v in sampling.items() if v is not None},
            priority=args.priority,
            timeout_s=args.timeout,
            model=args.model,
        ):
            if first_token_s is None:
                first_token_s = time.monotonic() - start
            sys.stdout.write(response["text"])
            sys.stdout.flush()
            generated += len(response["token_ids"])
            prompt_tokens = response["prompt_tokens"] or prompt_tokens
            finish = response["finish_reason"] or finish
    except GenerationError as err:
        sys.stdout.write("\n" if first_token_s is not None else "")  # end a partly printed answer
        print(f"ask-repo: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    elapsed = time.monotonic() - start
    ttft = f"{first_token_s:.3f}" if first_token_s is not None else "-"
    print(f"\n[finish: {finish or '-'}, prompt tokens: {prompt_tokens}, generated tokens: {generated}, "
          f"first response: {ttft} s, total: {elapsed:.3f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
