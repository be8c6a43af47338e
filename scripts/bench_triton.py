"""The whole Triton path under load: a real tritonserver, gRPC streaming, one 448 px image each.

    python scripts/bench_triton.py --repository REPO [--concurrency 1 4 8 64] [--out triton.json]
        [--perf-analyzer PATH]

Starts the repository with serve.py's TritonServer, then for each concurrency:
- a tritonclient streaming generator, closed loop (each stream sends its next request when one
  ends; past 8 streams, in client processes of 8 streams each), after one unmeasured wave of as
  many requests as streams: time to first token, time per output token, output tokens/s;
- the real perf_analyzer (--streaming, gRPC) on the same inputs, when its binary is given.
Records the server's GPU memory (nvidia-smi, all processes). Prints a table and writes JSON.
Measuring capacity needs a tier that admits the concurrency: build the repository with
`--tiers scripts/tiers_capacity.json` (one tier, 256 at once); the default tiers cap a server
at 4 + 2 + 1 requests decoding at once.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import functools
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf_analyzer_load import run_perf_analyzer  # noqa: E402
from triton_trace import (  # noqa: E402
    Tracing,
    engine_first_token_seconds,
    engine_step_totals,
    engine_ttft_mean_ms,
    server_args,
    ttft_breakdown,
)
from workload import PROMPT, encoded_image  # noqa: E402

from builder.client import stream_generate  # noqa: E402
from builder.serve import TritonServer  # noqa: E402
from model_repository.qwen3vl_runtime.engine.step_log import STEP_LOG_ENV  # noqa: E402

NEW_TOKENS = 128
# Streams per client process. In one process, 64 streams' responses share one GIL: in run 15 (H200,
# int8, 64 streams) the client saw the first token 66 ms after the server had sent it (Triton's
# trace), and each stream's next request left that much later (docs/benchmarks.md).
STREAMS_PER_PROCESS = 8
PARAMETERS = {"max_tokens": NEW_TOKENS, "ignore_eos": True, "temperature": 0}


def gpu_memory_gib() -> float:
    """GPU memory in use on GPU 0 (the server's processes: one copy of the weights, KV cache)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True
        )
    except FileNotFoundError:  # a CPU machine
        return float("nan")
    return float(out.stdout.split()[0]) / 1024 if out.returncode == 0 else float("nan")


def gpu_name() -> str:
    """GPU 0's name (nvidia-smi), or "cpu" where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    except FileNotFoundError:
        return "cpu"
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else "cpu"


STAGES = ("queue", "compute_input", "compute_infer", "compute_output")


def model_statistics(url: str) -> dict:
    """Triton's cumulative per-model counters: successful requests and nanoseconds per stage."""
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(as_json=True)
    out = {}
    for model in stats.get("model_stats", []):
        inference = model.get("inference_stats", {})
        out[model["name"]] = {"count": int(inference.get("success", {}).get("count", 0)), "executions": int(model.get("execution_count", 0))} | {
            stage: int(inference.get(stage, {}).get("ns", 0)) for stage in STAGES
        }
    return out


def stage_times(before: dict, after: dict) -> dict:
    """Mean milliseconds per request in each model's queue and compute stages between two snapshots
    (Triton counts a batched execute's time once for each of its requests), and requests per
    execute. The decoupled decoder's compute_infer is only its execute(), which hands requests over."""
    times = {}
    for name, end in after.items():
        start = before.get(name, {"count": 0, "executions": 0} | dict.fromkeys(STAGES, 0))
        count, executions = end["count"] - start["count"], end["executions"] - start["executions"]
        if count:
            times[name] = {"requests": count, "requests_per_execute": round(count / max(executions, 1), 2)} | {
                f"{stage}_ms": round((end[stage] - start[stage]) / count / 1e6, 2) for stage in STAGES
            }
    return times


def gpu_processes() -> list[dict]:
    """GPU memory per process (nvidia-smi), to tell the decoder's from the vision encoder's."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True,
        )  # fmt: skip
    except FileNotFoundError:
        return []
    rows = []
    for line in out.stdout.splitlines():
        pid, mib = (part.strip() for part in line.split(","))
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
        except OSError:
            command = "?"
        rows.append({"pid": int(pid), "gib": round(int(mib) / 1024, 3), "command": command})
    return rows


def closed_loop(url: str, image: bytes | None, concurrency: int, requests: int) -> dict:
    """``concurrency`` streams, each sending its next request when one ends, ``requests`` in all.

    Past STREAMS_PER_PROCESS streams they are spread over client processes of that many streams
    each (requests split evenly). The wall time runs from the first request sent to the last
    response received."""
    processes = -(-concurrency // STREAMS_PER_PROCESS)
    if processes == 1:
        records = stream_requests(url, image, concurrency, requests)
    else:
        shares = [(concurrency * i // processes, requests * i // processes) for i in range(processes + 1)]
        jobs = [client_pool(processes).submit(stream_requests, url, image, s1 - s0, r1 - r0) for (s0, r0), (s1, r1) in zip(shares, shares[1:])]
        records = [r for job in jobs for r in job.result()]
    if len(records) < requests:
        raise RuntimeError(f"only {len(records)} of {requests} requests completed; see the errors above")
    first, last = min(start for start, _, _ in records), max(times[-1] for _, times, _ in records)
    wall = last - first
    ttft = [(times[0] - start) * 1e3 for start, times, _ in records]
    tpot = [(times[-1] - times[0]) / max(tokens - 1, 1) * 1e3 for _, times, tokens in records]
    return {
        "requests": len(records),
        "client_processes": processes,
        "ttft_p50_ms": float(np.percentile(ttft, 50)),
        "ttft_p99_ms": float(np.percentile(ttft, 99)),
        "tpot_p50_ms": float(np.percentile(tpot, 50)),
        "output_tok_per_s": sum(tokens for *_, tokens in records) / wall,
        "responses_per_s": sum(len(times) for _, times, _ in records) / wall,
        # CLOCK_MONOTONIC, the clock of the step log's lines: scripts/step_log_summary.py cuts it here.
        "monotonic_window_s": [first, last],
    }


@functools.cache
def client_pool(processes: int) -> concurrent.futures.ProcessPoolExecutor:
    """Client processes kept for the whole run (started, and tritonclient imported, once: each
    load's first, unmeasured wave meets them cold). Spawned: no fork of a process with gRPC threads."""
    return concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=_import_client)


def _import_client() -> None:
    import tritonclient.grpc  # noqa: F401


def stream_requests(url: str, image: bytes | None, streams: int, requests: int) -> list[tuple]:
    """``streams`` threads of this process sending ``requests`` in all, closed loop -> one
    (start, response times, tokens) per completed request (perf_counter: CLOCK_MONOTONIC, one
    clock for every process of the machine)."""
    records, lock = [], threading.Lock()
    remaining = [requests]

    def stream():
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            start = time.perf_counter()
            times, tokens = [], 0
            try:
                images = [image] if image is not None else []
                for response in stream_generate(url, PROMPT, images, parameters=PARAMETERS, timeout_s=300):
                    times.append(time.perf_counter())
                    tokens += len(response["token_ids"])
            except Exception as exc:  # reported once, the run then fails with a count
                print(f"request failed: {exc}", file=sys.stderr)
                return
            with lock:
                records.append((start, times, tokens))

    threads = [threading.Thread(target=stream) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def traced_first_token(server: TritonServer, image: bytes, trace_folder: Path, concurrency: int) -> dict:
    """``concurrency`` streams, each request traced (two waves; eight requests at one stream): the
    time to first token split into the server's steps (Triton's trace), the engine's own part (its
    Prometheus counters) and the rest (the client)."""
    for old in trace_folder.glob("trace.json*"):  # an earlier concurrency's traces
        old.unlink()
    first_tokens = engine_first_token_seconds(server.metrics_url)
    with Tracing(server.grpc_url):
        row = closed_loop(server.grpc_url, image, concurrency, max(2 * concurrency, 8))
    engine_ms = engine_ttft_mean_ms(server.metrics_url, first_tokens)
    out = ttft_breakdown(trace_folder)
    out["client_ttft_p50_ms"] = round(row["ttft_p50_ms"], 2)
    if engine_ms is not None:
        out["engine_ttft_mean_ms"] = engine_ms
    if "server_to_first_response_ms" in out:
        out["client_and_network_ms"] = round(out["client_ttft_p50_ms"] - out["server_to_first_response_ms"], 2)
    print(f"    time to first token at {concurrency} streams, traced: {out}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8, 64])
    p.add_argument("--perf-analyzer", help="path of the perf_analyzer binary (tritonclient's wheel has one)")
    p.add_argument("--precision", default="int8", help="label for the table (the repository's --quant)")
    p.add_argument("--out", type=Path, default=Path("bench_triton.json"))
    p.add_argument("--text-only", action="store_true", help="no image: the decode and response path alone")
    p.add_argument("--server-arg", action="append", default=[], help="extra tritonserver argument (repeatable)")
    p.add_argument("--server-log", type=Path, help="keep tritonserver's log here")
    p.add_argument("--trace-at", nargs="*", type=int, default=[1], help="concurrencies whose time to first token is traced (with an image); none: no trace")
    p.add_argument("--step-log", type=Path, help="the decoder writes one JSON line per engine step to STEP_LOG.<instance>.jsonl")
    args = p.parse_args()
    image = None if args.text_only else encoded_image()
    rows = []
    workdir = tempfile.TemporaryDirectory()
    extra = (*args.server_arg, *server_args(Path(workdir.name)))
    if args.step_log:
        os.environ[STEP_LOG_ENV] = str(args.step_log.resolve())  # the server inherits it
    server = TritonServer(args.repository, ready_timeout_s=600, extra_args=extra, log_path=args.server_log)
    options = json.loads((args.repository / "manifest.json").read_text())["options"]
    with server, workdir:
        # Warm-up: two requests through every preprocess instance at once. Each instance's first
        # request costs more (run 12 on an H200: 20 ms of preprocess against 16, after the model's
        # own warm-up at initialize), and one stream's eight measured requests would otherwise
        # each meet a fresh instance of an eight-instance build.
        warm = max(2, options.get("preprocess_instances", 2))
        closed_loop(server.grpc_url, image, warm, 2 * warm)
        print("| system        | prec  |   c | TTFT p50 | TTFT p99 | TPOT ms |    tok/s | GiB    |")
        print("|---|---|---|---|---|---|---|---|")
        for c in args.concurrency:
            # One unmeasured wave first, as bench_engine.py: c images arriving together for the first
            # time make the vision tower capture a graph for that many (kept as first_wave_*).
            first_wave = closed_loop(server.grpc_url, image, c, c)
            before, first_tokens = model_statistics(server.grpc_url), engine_first_token_seconds(server.metrics_url)
            totals = engine_step_totals(server.metrics_url)
            row = closed_loop(server.grpc_url, image, c, max(3 * c, 8))
            row.update(first_wave_ttft_p99_ms=first_wave["ttft_p99_ms"], first_wave_tok_per_s=first_wave["output_tok_per_s"])
            row["triton_stages"] = stage_times(before, model_statistics(server.grpc_url))
            # The engine's own share of the first token (submit to first token), beside the client's,
            # its step phases in ms per step and its prompts per prefill (as bench_engine.py reports
            # them for the engine alone).
            row["engine_ttft_mean_ms"] = engine_ttft_mean_ms(server.metrics_url, first_tokens)
            steps = engine_step_totals(server.metrics_url).since(totals)
            row.update(engine_phase_ms_per_step=steps["phase_ms_per_step"], engine_prefill_steps=steps["prefill_steps"],
                       engine_prompts_per_prefill=steps["prompts_per_prefill"])  # fmt: skip
            row.update(system="triton-grpc", precision=args.precision, concurrency=c, gpu_mem_gib=gpu_memory_gib())
            row["gpu_processes"] = gpu_processes()
            if args.perf_analyzer and image is not None:
                entries = [(PROMPT, [image])]
                row["perf_analyzer"] = run_perf_analyzer(args.perf_analyzer, server.grpc_url, entries, c, Path(workdir.name))
            rows.append(row)
            print(
                f"| triton-grpc   | {args.precision:<5} | {c:>3} | {row['ttft_p50_ms']:8.1f} | {row['ttft_p99_ms']:8.1f} | "
                f"{row['tpot_p50_ms']:7.2f} | {row['output_tok_per_s']:8.0f} | {row['gpu_mem_gib']:6.2f} |",
                flush=True,
            )
            print(f"    the engine's own time to first token (mean): {row['engine_ttft_mean_ms']} ms; ms per step: {row['engine_phase_ms_per_step']}; "
                  f"{row['engine_prefill_steps']} prefills of {row['engine_prompts_per_prefill']} prompts on average")  # fmt: skip
            for name, t in row["triton_stages"].items():
                print(f"    {name}: queue {t['queue_ms']} ms, compute {t['compute_input_ms']} + {t['compute_infer_ms']} + {t['compute_output_ms']} ms, "
                      f"{t['requests_per_execute']} requests per execute")  # fmt: skip
            for line in row.get("perf_analyzer", {}).get("summary", []):
                print(f"    perf_analyzer: {line}", flush=True)
            if "output_tok_per_s" in row.get("perf_analyzer", {}):
                print(f"    perf_analyzer: {row['perf_analyzer']['output_tok_per_s']:.0f} output tok/s (requests/s x {NEW_TOKENS})", flush=True)
        breakdowns = {str(c): traced_first_token(server, image, Path(workdir.name), c) for c in args.trace_at} if image is not None else {}
    report = {
        "machine": gpu_name(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "repository_manifest_options": options,
        "new_tokens": NEW_TOKENS,
        "image": None if image is None else "448x448 PNG",
        "results": rows,
        "ttft_breakdown": breakdowns,  # by concurrency
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
