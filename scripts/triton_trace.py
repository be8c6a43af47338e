"""Where a request's time to first token goes inside tritonserver, from Triton's own trace.

The server starts with tracing configured but off (``server_args``); ``Tracing`` turns it on for a
few requests through the trace API; ``ttft_breakdown`` reads the trace files (timestamps of the
ensemble and of each model it called, on the server's monotonic clock) and splits each request's
server time, from reading it off the gRPC stream to sending its first response, into steps.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from model_repository.qwen3vl_runtime.engine.metrics import StepTotals

ENSEMBLE = "qwen3_vl"
# Each step: (name, start, end); a point is (model, timestamp name, first or last occurrence).
STEPS = (
    ("grpc_read_to_ensemble", ("ensemble", "GRPC_WAITREAD_END", 0), ("ensemble", "REQUEST_START", 0)),
    ("preprocess_queue", ("ensemble", "REQUEST_START", 0), ("preprocess", "COMPUTE_START", 0)),
    ("preprocess_compute", ("preprocess", "COMPUTE_START", 0), ("preprocess", "COMPUTE_END", 0)),
    ("to_decoder", ("preprocess", "COMPUTE_END", 0), ("language_model", "COMPUTE_START", 0)),
    ("decoder_execute", ("language_model", "COMPUTE_START", 0), ("language_model", "COMPUTE_END", 0)),
    # The engine's queue, prefill and first decode step, then the sender thread and the stub's IPC.
    ("engine_to_first_response", ("language_model", "COMPUTE_END", 0), ("ensemble", "INFER_RESPONSE_COMPLETE", 0)),
    ("grpc_send_first", ("ensemble", "INFER_RESPONSE_COMPLETE", 0), ("ensemble", "GRPC_SEND_END", 0)),
)


def server_args(folder: Path) -> tuple[str, ...]:
    """tritonserver arguments: trace files under ``folder``, tracing off until turned on."""
    return ("--trace-config", f"triton,file={folder}/trace.json", "--trace-config", "level=OFF")


class Tracing:
    """``with Tracing(grpc_url):`` traces every request (timestamps) sent inside the block."""

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)

    def __enter__(self) -> "Tracing":
        self.client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "log_frequency": "1"})
        return self

    def __exit__(self, *exc) -> None:
        self.client.update_trace_settings(settings={"trace_level": ["OFF"]})
        self.client.close()


def read_traces(folder: Path) -> dict[int, dict]:
    """Trace id -> {"model", "parent", "timestamps": {name: [ns, ...]}} over every trace file."""
    traces: dict[int, dict] = {}
    for path in sorted(Path(folder).glob("trace.json*")):
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError:  # a file the server is still writing
            continue
        for entry in entries:
            trace = traces.setdefault(entry["id"], {"model": None, "parent": None, "timestamps": {}})
            if "model_name" in entry:
                trace["model"], trace["parent"] = entry["model_name"], entry.get("parent_id")
            for stamp in entry.get("timestamps", []):
                trace["timestamps"].setdefault(stamp["name"], []).append(stamp["ns"])
    return traces


def ttft_breakdown(folder: Path, ensemble: str = ENSEMBLE) -> dict:
    """Median milliseconds per step over the traced requests, and their sum ("server_to_first_response")."""
    traces = read_traces(folder)
    steps: dict[str, list[float]] = {name: [] for name, *_ in STEPS}
    totals = []
    for trace_id, trace in traces.items():
        if trace["model"] != ensemble:
            continue
        models = {"ensemble": trace["timestamps"]}
        models |= {t["model"]: t["timestamps"] for t in traces.values() if t["parent"] == trace_id}

        def at(point):
            model, name, index = point
            stamps = models.get(model, {}).get(name)
            return sorted(stamps)[index] if stamps else None

        points = {name: (at(start), at(end)) for name, start, end in STEPS}
        if any(a is None or b is None for a, b in points.values()):
            continue  # not a complete request (no image step, or a file still being written)
        for name, (a, b) in points.items():
            steps[name].append((b - a) / 1e6)
        totals.append((points["grpc_send_first"][1] - points["grpc_read_to_ensemble"][0]) / 1e6)
    if not totals:
        return {"requests": 0}
    medians = {f"{name}_ms": round(statistics.median(values), 2) for name, values in steps.items()}
    return {"requests": len(totals), **medians, "server_to_first_response_ms": round(statistics.median(totals), 2)}


def engine_ttft_mean_ms(metrics_url: str, before: tuple[float, float]) -> float | None:
    """The engine's mean time to first token over the requests since ``before`` (a snapshot of
    ``engine_first_token_seconds``); waits for the decoder's next publication first."""
    import time

    time.sleep(1.2)  # the decoder publishes its counters twice a second
    total, count = engine_first_token_seconds(metrics_url)
    return round((total - before[0]) / (count - before[1]) * 1e3, 2) if count > before[1] else None


def _engine_series(metrics_url: str) -> list[tuple[str, dict[str, str], float]]:
    """The decoder's Prometheus series (qwen3vl_*): (name, labels, value)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    series = []
    for name, labels, value in re.findall(r"^(qwen3vl_\w+)\{([^}]*)\} (\S+)", text, re.M):
        series.append((name, dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return series


def engine_first_token_seconds(metrics_url: str) -> tuple[float, float]:
    """(sum of seconds, requests) of the engine's own time to first token (submit to first token,
    Prometheus counters the decoder publishes twice a second), summed over tiers and engines."""
    series = _engine_series(metrics_url)
    total = sum(v for name, _, v in series if name == "qwen3vl_time_to_first_token_seconds_sum")
    return total, sum(v for name, _, v in series if name == "qwen3vl_time_to_first_token_seconds_count")


def engine_step_totals(metrics_url: str) -> StepTotals:
    """The engine's step totals (``StepTotals``: steps, wall seconds per phase of ``Engine.step``,
    prefill steps and their prompts) so far, from its Prometheus counters, summed over engines:
    what bench_engine.py reports for the engine alone."""
    series = _engine_series(metrics_url)
    phases: dict[str, float] = {}
    for name, labels, value in series:
        if name == "qwen3vl_engine_phase_seconds_total":
            phases[labels["phase"]] = phases.get(labels["phase"], 0.0) + value
    total = lambda metric: int(sum(v for name, _, v in series if name == f"qwen3vl_{metric}_total"))  # noqa: E731
    return StepTotals(total("engine_steps"), phases, total("prefill_steps"), total("prefilled_prompts"))
