"""Drive several tiers at once with open-loop (Poisson) arrivals and measure each tier.

    python scripts/load_tiers.py --repository REPO --rate vip=2 --rate free=6 --duration 30 \
        [--max-tokens 64] [--out load.json] [--report load.md]
    python scripts/load_tiers.py --url HOST:8001 --tiers-from REPO ...   (a server already running)

Each tier sends requests at its own rate (exponential gaps) for --duration seconds, each request
with the tier's Triton priority and its `tier` parameter, one 448 px image and a short prompt. The
run stops by itself: arrivals end at --duration, requests still running get --drain seconds.
Per tier: requests, ok, rejected, timed_out, other errors, TTFT / time per output token /
end-to-end p50, p95, p99, output tokens/s. Writes JSON and a markdown report (plus a latency CDF
PNG when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import encoded_image, pyplot  # noqa: E402

from builder.client import GenerationError, refusal_kind, stream_generate  # noqa: E402
from model_repository.qwen3vl_runtime.tiers import DEFAULT_TIERS, TierTable  # noqa: E402

PROMPT = "Describe this picture in one short paragraph."


def one_request(url: str, tier, image: bytes, max_tokens: int, timeout_s: float) -> dict:
    start = time.perf_counter()
    times, tokens = [], 0
    try:
        for response in stream_generate(
            url,
            PROMPT,
            [image],
            parameters={"tier": tier.name, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0},
            priority=tier.priority,
            timeout_s=timeout_s,
        ):
            times.append(time.perf_counter())
            tokens += len(response["token_ids"])
    except GenerationError as exc:
        message = str(exc)
        outcome = {"queue_timeout": "timed_out", "queue_full": "rejected"}.get(refusal_kind(exc), "error")
        return {"tier": tier.name, "outcome": outcome, "message": message[:200]}
    return {
        "tier": tier.name,
        "outcome": "ok",
        "ttft_s": times[0] - start,
        "e2e_s": times[-1] - start,
        "tpot_s": (times[-1] - times[0]) / max(tokens - 1, 1),
        "tokens": tokens,
    }


def run(
    url: str,
    table: TierTable,
    rates: dict[str, float],
    duration_s: float,
    max_tokens: int,
    drain_s: float,
    seed: int,
    streams: dict[str, int] | None = None,
) -> list[dict]:
    """Open-loop arrivals at `rates` (requests/s per tier) and closed-loop `streams` (that many
    requests in flight per tier, each sending its next when one ends) for `duration_s`."""
    image = encoded_image()
    results, lock = [], threading.Lock()
    pool = ThreadPoolExecutor(max_workers=256)
    end = time.perf_counter() + duration_s

    def record(result):
        with lock:
            results.append(result)

    def arrivals(tier, rate, rng):
        while True:
            time.sleep(rng.expovariate(rate))
            if time.perf_counter() >= end:
                return
            future = pool.submit(one_request, url, tier, image, max_tokens, duration_s + drain_s)
            future.add_done_callback(lambda f: record(f.result()))

    def closed_loop(tier):
        while time.perf_counter() < end:
            record(one_request(url, tier, image, max_tokens, duration_s + drain_s))

    threads = [
        threading.Thread(target=arrivals, args=(table.get(name), rate, random.Random(seed + i)))
        for i, (name, rate) in enumerate(rates.items())
    ]
    for name, count in (streams or {}).items():
        threads += [threading.Thread(target=closed_loop, args=(table.get(name),)) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.shutdown(wait=True, cancel_futures=False)
    return results


def summarize(results: list[dict], duration_s: float) -> dict:
    def pct(values, q):
        return round(float(np.percentile(values, q)) * 1e3, 1) if values else None

    summary = {}
    for tier in sorted({r["tier"] for r in results}):
        rows = [r for r in results if r["tier"] == tier]
        ok = [r for r in rows if r["outcome"] == "ok"]
        summary[tier] = {
            "requests": len(rows),
            "ok": len(ok),
            "rejected": sum(r["outcome"] == "rejected" for r in rows),
            "timed_out": sum(r["outcome"] == "timed_out" for r in rows),
            "errors": sum(r["outcome"] == "error" for r in rows),
            **{f"ttft_p{q}_ms": pct([r["ttft_s"] for r in ok], q) for q in (50, 95, 99)},
            "tpot_p50_ms": pct([r["tpot_s"] for r in ok], 50),
            **{f"e2e_p{q}_ms": pct([r["e2e_s"] for r in ok], q) for q in (50, 95, 99)},
            "output_tok_per_s": round(sum(r["tokens"] for r in ok) / duration_s, 1),
        }
    return summary


def report(summary: dict, path: Path, results: list[dict]) -> None:
    columns = [
        "requests",
        "ok",
        "rejected",
        "timed_out",
        "errors",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "tpot_p50_ms",
        "e2e_p99_ms",
        "output_tok_per_s",
    ]
    lines = ["| tier | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {tier} | " + " | ".join(str(row[c]) for c in columns) + " |" for tier, row in summary.items()]
    path.write_text("\n".join(lines) + "\n")
    plt = pyplot()
    if plt is not None:
        figure, axis = plt.subplots()
        ttft_cdf(axis, results)
        figure.savefig(path.with_suffix(".png"), dpi=120)


def ttft_cdf(axis, results: list[dict], title: str = "", tiers: list[str] | None = None) -> None:
    """One line per tier on ``axis``: the fraction of its served requests by time to first token.
    ``tiers`` fixes each tier's colour across several plots (default: the tiers present, sorted)."""
    tiers = tiers or sorted({r["tier"] for r in results})
    for colour, tier in enumerate(tiers):
        ttft = np.sort([r["ttft_s"] * 1e3 for r in results if r["tier"] == tier and r["outcome"] == "ok"])
        if len(ttft):
            axis.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=tier, color=f"C{colour}")
    axis.set_xlabel("time to first token (ms)")
    axis.set_ylabel("fraction of served requests")
    axis.set_title(title, fontsize=9)
    axis.legend()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--repository", type=Path, help="start a server on this repository for the run")
    where.add_argument("--url", help="gRPC HOST:PORT of a running server")
    p.add_argument("--tiers-from", type=Path, help="repository whose manifest gives the tiers (with --url)")
    p.add_argument("--rate", action="append", default=[], metavar="TIER=REQ_PER_S", help="open-loop arrivals")
    p.add_argument("--streams", action="append", default=[], metavar="TIER=N", help="closed-loop streams")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    p.add_argument("--drain", type=float, default=60.0, help="seconds requests still running may take")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("load_tiers.json"))
    p.add_argument("--report", type=Path, default=Path("load_tiers.md"))
    args = p.parse_args()
    rates = {name: float(rate) for name, rate in (item.split("=", 1) for item in args.rate)}
    streams = {name: int(count) for name, count in (item.split("=", 1) for item in args.streams)}
    if not rates and not streams:
        p.error("give at least one --rate or --streams")
    manifest_repo = args.repository or args.tiers_from
    table = DEFAULT_TIERS
    if manifest_repo:
        table = TierTable.from_json(json.dumps(json.loads((manifest_repo / "manifest.json").read_text())["options"]["tiers"]))
    for name in [*rates, *streams]:
        table.get(name)  # an unknown tier fails here, before any load
    if args.repository:
        from builder.serve import TritonServer

        with TritonServer(args.repository) as server:
            results = run(server.grpc_url, table, rates, args.duration, args.max_tokens, args.drain, args.seed, streams)
    else:
        results = run(args.url, table, rates, args.duration, args.max_tokens, args.drain, args.seed, streams)
    summary = summarize(results, args.duration)
    args.out.write_text(
        json.dumps(
            {"command": " ".join(sys.argv), "rates": rates, "streams": streams, "duration_s": args.duration, "tiers": summary},
            indent=2,
        )
        + "\n"
    )
    report(summary, args.report, results)
    print(args.report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
