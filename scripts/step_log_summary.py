"""What the engine did during each measured load of a bench_triton.py or bench_engine.py run, from its step log.

    python scripts/bench_triton.py --repository R --step-log /tmp/steps --out triton.json ...
    python scripts/step_log_summary.py /tmp/steps.*.jsonl --bench triton.json [--out steps.json]
    python scripts/bench_engine.py --checkpoint C --step-log /tmp/alone --out engine.json ...   # the engine alone
    python scripts/step_log_summary.py /tmp/alone.*.jsonl --bench engine.json

For each row of the benchmark (its ``monotonic_window_s``, the clock of the log's lines), over
the engine steps inside that window: how many rows a step decoded on average (against the
row's concurrency: the streams that were not decoding were before their first token), how many
steps prefilled and how many prompts each took, how long a prompt had waited from its submit to
its prefill (p50 / p99), how many were left waiting, the engine thread's ms per step by phase
and how many of its host phases' ms it spent off the CPU (waiting for the GIL, most likely), the
share of the window spent in prefill steps and the steps right after them, the prefill steps by
their prompts (the thread's ms launching each, the next step's ms), and the vision graphs
captured inside the window with their ms. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import write_host_report  # noqa: E402


def read_steps(paths: list[Path]) -> list[dict]:
    steps = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    return sorted(steps, key=lambda step: step["t"])


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def by_prompts(inside: list[dict]) -> dict[str, dict]:
    """Prefill steps grouped by their prompts: how many, the ms the engine thread spent launching
    the prefill, and the whole next step's ms (mostly waiting for this one's GPU work)."""
    groups: dict[int, list[tuple[float, float]]] = {}
    for step, after in zip(inside, inside[1:]):
        if step["prefilled"]:
            groups.setdefault(step["prefilled"], []).append((step["ms"].get("prefill", 0.0), sum(after["ms"].values())))
    return {
        str(n): {"steps": len(g), "launch_ms": round(statistics.mean(a for a, _ in g), 1), "next_step_ms": round(statistics.mean(b for _, b in g), 1)}
        for n, g in sorted(groups.items())
    }


def off_cpu_ms(inside: list[dict]) -> dict[str, float] | None:
    """Per host phase (all but "wait", where the CUDA runtime may spin), the engine thread's ms a
    step off the CPU: the phase's wall time minus the thread's CPU time (``PhaseClock``). On the
    GPU those phases only launch work and handle tokens, so this is time the thread waited to run
    (for the GIL, most likely); on the CPU "prefill" and "decode" also wait for PyTorch's own
    threads. None for a log written before the CPU times were."""
    if not all("cpu_ms" in s for s in inside):
        return None
    names = sorted({name for s in inside for name in s["ms"]} - {"wait"})
    # + 0.0: a phase whose CPU time the clocks' rounding puts a hair above its wall time reads 0.0, not -0.0
    return {name: round(sum(s["ms"].get(name, 0.0) - s["cpu_ms"].get(name, 0.0) for s in inside) / len(inside), 3) + 0.0 for name in names}


def summarize(steps: list[dict], start: float, end: float) -> dict:
    inside = [s for s in steps if start <= s["t"] < end]
    if not inside:
        return {"steps": 0}
    prefills = [s for s in inside if s["prefilled"]]
    # Wall time of the prefill steps and of the steps right after them (their GPU work is waited
    # for there), as a share of the window.
    starts = [s["t"] for s in inside] + [end]
    covered = {j for i, s in enumerate(inside) if s["prefilled"] for j in (i, i + 1) if j < len(inside)}
    prefill_share = sum(starts[j + 1] - starts[j] for j in covered) / (end - start)
    waits = [w for s in prefills for w in s["prefill_waits_ms"]]
    phases = sorted({name for s in inside for name in s["ms"]})
    return {
        "steps": len(inside),
        "steps_per_s": round(len(inside) / (end - start), 1),
        "decoded_rows_mean": round(statistics.mean(s["decoded"] for s in inside), 2),
        "prefill_steps": len(prefills),
        "prompts_per_prefill": round(statistics.mean(s["prefilled"] for s in prefills), 2) if prefills else None,
        "prefill_wait_p50_ms": percentile(waits, 0.5),
        "prefill_wait_p99_ms": percentile(waits, 0.99),
        "waiting_mean": round(statistics.mean(s["waiting"] for s in inside), 2),
        "phase_ms_per_step": {name: round(sum(s["ms"].get(name, 0.0) for s in inside) / len(inside), 3) for name in phases},
        "host_off_cpu_ms_per_step": off_cpu_ms(inside),
        "prefill_and_next_step_share": round(prefill_share, 3),
        "prefills_by_prompts": by_prompts(inside),
        # Vision graphs captured on first sight of a size inside the window: stalls of every stream.
        "vision_graph_captures": sum("captured_ms" in s for s in inside),
        "vision_graph_capture_ms": round(sum(s.get("captured_ms", 0.0) for s in inside), 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", type=Path, help="the decoder's step logs (one per instance)")
    p.add_argument("--bench", type=Path, required=True, help="bench_triton.py's JSON of the same run")
    p.add_argument("--out", type=Path, default=Path("step_log_summary.json"))
    args = p.parse_args()
    steps = read_steps(args.logs)
    bench = json.loads(args.bench.read_text())
    rows = {}
    for row in bench["results"]:
        if "monotonic_window_s" in row:
            rows[f"{row['precision']} c={row['concurrency']}"] = summarize(steps, *row["monotonic_window_s"])
    print("| load | steps/s | rows decoded (mean) | prefills | prompts each | prefill wait p50 / p99 ms | waiting (mean) | prefill + next step, share of time | vision graph captures (ms) | ms per step by phase | ms off the CPU per step, by host phase |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if r["steps"]:
            print(f"| {name} | {r['steps_per_s']} | {r['decoded_rows_mean']} | {r['prefill_steps']} | {r['prompts_per_prefill']} | "
                  f"{r['prefill_wait_p50_ms']} / {r['prefill_wait_p99_ms']} | {r['waiting_mean']} | {r['prefill_and_next_step_share']} | "
                  f"{r['vision_graph_captures']} ({r['vision_graph_capture_ms']}) | {r['phase_ms_per_step']} | {r['host_off_cpu_ms_per_step']} |")  # fmt: skip
    print("\nPrefill steps by prompts (steps, ms launching the prefill, ms of the next step):")
    for name, r in rows.items():
        groups = r.get("prefills_by_prompts", {})
        print(f"  {name}: " + ", ".join(f"{n}: {g['steps']} x {g['launch_ms']} + {g['next_step_ms']}" for n, g in groups.items()))
    write_host_report(args.out, "results", rows, bench=bench.get("command"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
