"""Tiers on one GPU under overload, and one shared engine against the seed's three model copies.

    python scripts/tier_acceptance.py --repository REPO [--duration 20] [--out tier_acceptance.json]

REPO is a built repository (int8 for the recorded run). The layouts are derived from it with
configure-repo (hard-linked copies, no rebuild):
  shared/                                    the default tiers (vip 4, standard 2, free 1) on one
                                             engine, its KV pool for 4 + 2 + 1 requests x 2,048 tokens;
  seed-vip/, seed-standard/, seed-free/      one tier each, KV pool for its own cap: the seed's
                                             three model copies on one card.
Phases, --duration seconds of load each, 448 px image + short prompt, --max-tokens answers:
  1. shared: VIP alone at its cap (closed loop, 4 streams): VIP's unloaded time to first token;
  2. shared: VIP at its cap + Free open-loop at twice its capacity (cap / e2e p50 of phase 1);
  3. shared: every tier at its cap: throughput and GPU memory of one engine;
  4. seed: the three servers at once, each tier at its cap on its own copy.
GPU memory (nvidia-smi, the whole GPU) is sampled every 0.5 s during each phase. Prints a table
and writes JSON (per tier: requests, ok, rejected, timed_out, ttft_p50_ms, ttft_p99_ms,
tpot_p50_ms, e2e_p99_ms; per phase gpu_mem_gib and its min) and, with matplotlib, a PNG beside
it: the time-to-first-token CDF of each tier, one panel per phase.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_triton import gpu_memory_gib, gpu_processes  # noqa: E402
from load_tiers import run, summarize, ttft_cdf  # noqa: E402
from workload import pyplot  # noqa: E402

from builder.reconfigure import reconfigure_repository  # noqa: E402
from builder.serve import TritonServer  # noqa: E402
from model_repository.qwen3vl_runtime.tiers import DEFAULT_TIERS  # noqa: E402

CONTEXT = 2048
# The acceptance bounds of the sharing issue.
VIP_TTFT_P99_RATIO = 1.5
SHARED_GPU_GIB = 6.0


class MemorySampler:
    """Whole-GPU memory in use, sampled in a thread while a phase runs: its max and min."""

    def __init__(self, period_s: float = 0.5):
        self.period_s, self.samples = period_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.samples.append(gpu_memory_gib())
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {"gpu_mem_gib": round(max(self.samples), 3), "gpu_mem_min_gib": round(min(self.samples), 3)}


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    except FileNotFoundError:
        return "none (CPU)"
    return out.stdout.strip()


def layouts(repository: Path, workdir: Path) -> dict[str, Path]:
    caps = {t.name: t.max_concurrent for t in DEFAULT_TIERS.tiers}
    out = {"shared": workdir / "shared"}
    default_tiers = workdir / "default_tiers.json"
    default_tiers.write_text(DEFAULT_TIERS.to_json())
    # One vision instance: the smallest whole server (the source may have been built with more).
    changes = {"kv_cache_slots": sum(caps.values()), "max_context": CONTEXT, "tiers": default_tiers, "vision_instances": 1}
    reconfigure_repository(repository, changes, out["shared"])
    for tier in json.loads(DEFAULT_TIERS.to_json())["tiers"]:
        tiers_file = workdir / f"{tier['name']}.json"
        alone = {**tier, "priority": 1}  # the only tier of its server
        tiers_file.write_text(json.dumps({"default": tier["name"], "tiers": [alone]}))
        out[tier["name"]] = workdir / f"seed-{tier['name']}"
        changes = {"kv_cache_slots": tier["max_concurrent"], "max_context": CONTEXT, "tiers": tiers_file, "vision_instances": 1}
        reconfigure_repository(repository, changes, out[tier["name"]])
    return out


def phase(name: str, targets: list[tuple[str, dict, dict]], args, samples: dict) -> dict:
    """Run loads at once: (grpc url, rates, streams) per target; merged per-tier summary + memory.
    Each request's result is kept in ``samples[name]`` for the CDF plot."""
    results, threads = [], []
    with MemorySampler() as memory:
        for url, rates, streams in targets:

            def one(url=url, rates=rates, streams=streams):
                results.extend(run(url, DEFAULT_TIERS, rates, args.duration, args.max_tokens, args.drain, args.seed, streams))

            threads.append(threading.Thread(target=one))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    samples[name] = results
    summary = {"tiers": summarize(results, args.duration), **memory.summary(), "gpu_processes": gpu_processes()}
    summary["error_messages"] = sorted({r["message"] for r in results if r["outcome"] == "error"})[:5]
    summary["output_tok_per_s"] = round(sum(t["output_tok_per_s"] for t in summary["tiers"].values()), 1)
    print(
        f"\n## {name}  (GPU memory {summary['gpu_mem_min_gib']:.2f}-{summary['gpu_mem_gib']:.2f} GiB, "
        f"{summary['output_tok_per_s']:.0f} output tok/s)"
    )
    print("| tier | requests | ok | rejected | timed_out | TTFT p50 | TTFT p99 | TPOT p50 | e2e p99 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tier, row in summary["tiers"].items():
        print(
            f"| {tier} | {row['requests']} | {row['ok']} | {row['rejected']} | {row['timed_out']} | "
            f"{row['ttft_p50_ms']} | {row['ttft_p99_ms']} | {row['tpot_p50_ms']} | {row['e2e_p99_ms']} |",
            flush=True,
        )
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per phase")
    p.add_argument("--drain", type=float, default=30.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("tier_acceptance.json"))
    args = p.parse_args()
    caps = {t.name: t.max_concurrent for t in DEFAULT_TIERS.tiers}
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": socket.gethostname(),
        "gpu": gpu_name(),
        "command": " ".join(sys.argv),
        "max_tokens": args.max_tokens,
        "duration_s": args.duration,
        "phases": {},
    }
    samples = {}  # phase title -> its requests' results
    with tempfile.TemporaryDirectory(dir=args.repository.parent) as tmp:
        repos = layouts(args.repository, Path(tmp))
        with TritonServer(repos["shared"], ready_timeout_s=600) as server:
            url = server.grpc_url
            run(url, DEFAULT_TIERS, {}, 3.0, args.max_tokens, args.drain, args.seed, {"vip": 2})  # warm-up
            alone = report["phases"]["vip_alone"] = phase(
                "1. shared: VIP alone at its cap", [(url, {}, {"vip": caps["vip"]})], args, samples
            )
            free_rate = 2 * caps["free"] / (alone["tiers"]["vip"]["e2e_p50_ms"] / 1e3)
            report["free_rate_per_s"] = round(free_rate, 2)
            report["phases"]["free_overload"] = phase(
                f"2. shared: VIP at its cap + Free at {free_rate:.1f} req/s (twice its capacity)",
                [(url, {"free": free_rate}, {"vip": caps["vip"]})],
                args,
                samples,
            )
            report["phases"]["shared_all_caps"] = phase("3. shared: every tier at its cap", [(url, {}, caps)], args, samples)
        with ExitStack() as stack:
            servers = {t: stack.enter_context(TritonServer(repos[t], ready_timeout_s=600)) for t in caps}
            for t, s in servers.items():
                run(s.grpc_url, DEFAULT_TIERS, {}, 3.0, args.max_tokens, args.drain, args.seed, {t: 1})  # warm-up
            report["phases"]["seed_all_caps"] = phase(
                "4. seed: three copies, every tier at its cap", [(s.grpc_url, {}, {t: caps[t]}) for t, s in servers.items()], args, samples
            )
    overload = report["phases"]["free_overload"]
    ratio = overload["tiers"]["vip"]["ttft_p99_ms"] / alone["tiers"]["vip"]["ttft_p99_ms"]
    report["acceptance"] = {
        "vip_ttft_p99_ratio": round(ratio, 3),
        "vip_ttft_p99_within_1_5x": ratio <= VIP_TTFT_P99_RATIO,
        "free_rejected_or_timed_out": overload["tiers"]["free"]["rejected"] + overload["tiers"]["free"]["timed_out"],
        "errors": sum(t["errors"] for ph in report["phases"].values() for t in ph["tiers"].values()),
        "shared_gpu_mem_gib": max(report["phases"][k]["gpu_mem_gib"] for k in ("vip_alone", "free_overload", "shared_all_caps")),
        "gpu_mem_drift_under_overload_gib": round(overload["gpu_mem_gib"] - overload["gpu_mem_min_gib"], 3),
        "seed_gpu_mem_gib": report["phases"]["seed_all_caps"]["gpu_mem_gib"],
    }
    report["acceptance"]["shared_within_6_gb"] = report["acceptance"]["shared_gpu_mem_gib"] * 2**30 <= SHARED_GPU_GIB * 1e9
    print("\n" + json.dumps(report["acceptance"], indent=2))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot_phases(samples, args.out.with_suffix(".png"))
    return 0


def plot_phases(samples: dict[str, list[dict]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(1, len(samples), figsize=(4.5 * len(samples), 4), sharey=True)
    tiers = [t.name for t in DEFAULT_TIERS.tiers]
    for axis, (title, results) in zip(axes, samples.items()):
        ttft_cdf(axis, results, title, tiers)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
