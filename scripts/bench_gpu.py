"""The GPU benchmark of record: transformers, the engine alone and the whole Triton path, one run.

    python scripts/bench_gpu.py --checkpoint DIR --repository int8=REPO [--repository bf16=REPO ...]
        [--perf-analyzer PATH] [--skip-transformers] [--out bench_gpu.json] [--assemble]

Runs, one after the other on the same GPU and the same inputs (448 px image + ~40 text tokens,
128 new tokens, concurrency 1, 4, 8, 64): bench_engine.py (transformers `generate` eager bf16,
with --transformers-static also with a static KV cache compiled by transformers, and the engine
alone in each precision of the repositories), then bench_triton.py on each repository
(real tritonserver, gRPC streaming, plus the real perf_analyzer when given). Each runs in its own
process, so one's GPU memory is gone before the next starts. Prints one table and writes one JSON
with machine, date, command and, per (system, precision, concurrency), ttft_p50_ms, ttft_p99_ms,
tpot_p50_ms, output_tok_per_s, gpu_mem_gib; with matplotlib, a PNG of throughput against
concurrency beside the JSON. ``--assemble`` runs nothing: it writes the report from the parts'
JSON a run left beside --out (each part is kept as it finishes; a part rerun alone by hand, with the
arguments this script gives it, can take its place).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workload import pyplot  # noqa: E402


def run(script: str, *args: str) -> None:
    command = [sys.executable, str(HERE / script), *args]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def plot(rows: list[dict], path: Path) -> None:
    """Output tokens/s against concurrency, one line per (system, precision); needs matplotlib."""
    plt = pyplot()
    if plt is None:
        return
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(f"{r['system']} {r['precision']}", []).append((r["concurrency"], r["output_tok_per_s"]))
    for label, points in series.items():
        points.sort()
        plt.plot([c for c, _ in points], [t for _, t in points], marker="o", label=label)
    plt.xscale("log", base=2)
    plt.xlabel("concurrent streams")
    plt.ylabel("output tokens/s")
    plt.legend(fontsize=7)
    plt.savefig(path, dpi=120)
    plt.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--repository", action="append", required=True, metavar="PRECISION=DIR")
    p.add_argument("--perf-analyzer", help="path of the perf_analyzer binary")
    p.add_argument("--concurrency", nargs="+", default=["1", "4", "8", "64"])
    p.add_argument("--trace-at", nargs="+", default=["1"], help="concurrencies whose time to first token Triton's trace splits up")
    p.add_argument("--step-log", help="prefix of the decoder's step logs (bench_triton.py --step-log), one per precision: PREFIX-PRECISION")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--transformers-static", action="store_true", help="also transformers with a static, compiled KV cache (bench_engine.py)")
    p.add_argument("--vision-in-engine", action="store_true", help="engine rows encode the image too (--vision-backend decoder)")
    p.add_argument("--device", default="cuda", help="cpu: a slow smoke test of the whole run")
    p.add_argument("--out", type=Path, default=Path("bench_gpu.json"))
    p.add_argument("--assemble", action="store_true", help="run nothing: report from the parts' JSON beside --out")
    args = p.parse_args()
    repositories = dict(item.split("=", 1) for item in args.repository)
    # The engine rows serve as the repositories do: the prefill from graphs (build-repo
    # --graphed-prefill), the vision graphs captured at start (--vision-graph-sizes), the KV cache.
    built = [] if args.assemble else [json.loads((Path(r) / "manifest.json").read_text())["options"] for r in repositories.values()]
    kv_caches = {options.get("kv_cache_dtype", "auto") for options in built}
    if len(kv_caches) > 1:
        p.error(f"the repositories' KV caches differ ({', '.join(sorted(kv_caches))}); the engine rows take one: benchmark them apart")
    serving = [*(["--graphed-prefill"] if any(o.get("graphed_prefill") for o in built) else []),
               *(["--vision-graphs-at-start"] if any(o.get("vision_graph_sizes") for o in built) else []),
               *(["--kv-cache-dtype", kv_caches.pop()] if kv_caches else [])]  # fmt: skip
    # Each part's own JSON is kept beside --out (a run cut short keeps what it measured).
    parts = args.out.parent
    parts.mkdir(parents=True, exist_ok=True)
    engine_json = parts / f"{args.out.stem}.engine.json"
    engine_args = ["--checkpoint", str(args.checkpoint), "--out", str(engine_json), "--precisions", *repositories]
    if not args.assemble:
        run("bench_engine.py", *engine_args, "--concurrency", *args.concurrency,
            "--device", args.device, *(["--skip-transformers"] if args.skip_transformers else []),
            *(["--transformers-static"] if args.transformers_static else []),
            *(["--vision-in-engine"] if args.vision_in_engine else []), *serving)  # fmt: skip
    engine = json.loads(engine_json.read_text())
    rows, manifests, breakdowns, commands = list(engine["results"]), {}, {}, [engine["command"]]
    for precision, repository in repositories.items():
        out = parts / f"{args.out.stem}.triton-{precision}.json"
        extra = ["--perf-analyzer", args.perf_analyzer] if args.perf_analyzer else []
        extra += ["--step-log", f"{args.step_log}-{precision}"] if args.step_log else []
        if not args.assemble:
            run("bench_triton.py", "--repository", repository, "--precision", precision, "--out", str(out),
                "--concurrency", *args.concurrency, "--trace-at", *args.trace_at, *extra)  # fmt: skip
        triton = json.loads(out.read_text())
        rows += triton["results"]
        manifests[precision] = triton["repository_manifest_options"]
        commands.append(triton["command"])
        breakdowns[precision] = triton["ttft_breakdown"]
    report = {
        "machine": engine["machine"],
        "date": engine["date"] if args.assemble else datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "part_commands": commands,
        "torch": engine["torch"],
        "prompt_tokens": engine["prompt_tokens"],
        "new_tokens": engine["new_tokens"],
        "vision_ms_transformers_bf16": engine["vision_ms_transformers_bf16"],
        "repositories": manifests,
        "results": rows,
        "triton_ttft_breakdown": breakdowns,  # by precision, then concurrency
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    # Through Triton, the output tok/s of the same load by perf_analyzer (C++) beside the Python
    # client's: at 64 streams they differed by 16% in run 15.
    print("\n| system | precision | c | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | output tok/s | perf_analyzer tok/s | GPU GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pa = r.get("perf_analyzer", {}).get("output_tok_per_s")
        print(
            f"| {r['system']} | {r['precision']} | {r['concurrency']} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
            f"{r['tpot_p50_ms']:.2f} | {r['output_tok_per_s']:.0f} | {'' if pa is None else f'{pa:.0f}'} | {r['gpu_mem_gib']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
