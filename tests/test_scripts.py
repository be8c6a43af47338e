"""The benchmark scripts still run (on the CPU, tiny model, smallest settings): they are not in
any other test, and a refactor once broke one silently."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

pytestmark = pytest.mark.slow


def run(script: str, *args: str) -> None:
    out = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


def test_bench_engine_with_the_vision_tower_in_the_engine(tiny_checkpoint, tmp_path):
    """With its step log, which step_log_summary.py cuts at the measured window (on the CPU
    --vision-graphs-at-start has no graphs to capture, and none is captured inside)."""
    out = tmp_path / "engine.json"
    run("bench_engine.py", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--precisions", "int8",
        "--concurrency", "1", "--skip-transformers", "--slots", "2", "--max-len", "512", "--vision-in-engine",
        "--vision-graphs-at-start", "--sampled", "--step-log", str(tmp_path / "steps"), "--out", str(out))  # fmt: skip
    (row,) = json.loads(out.read_text())["results"]
    assert row["system"] == "engine+vision" and row["output_tok_per_s"] > 0 and row["ttft_p50_ms"] > 0 and row["sampled"]
    # 8 requests x 128 tokens, one at a time: a step per token, and every phase timed
    assert row["steps"] >= 8 * 128 and set(row["phase_ms_per_step"]) == {"schedule", "prefill", "decode", "wait", "output"}
    assert (row["prefill_steps"], row["prompts_per_prefill"]) == (8, 1.0)  # one stream: each prompt alone
    assert (row["vision_graph_captures"], row["vision_graph_capture_ms"]) == (0, 0.0)
    run("step_log_summary.py", str(tmp_path / "steps.int8.jsonl"), "--bench", str(out), "--out", str(tmp_path / "summary.json"))
    (summary,) = json.loads((tmp_path / "summary.json").read_text())["results"].values()
    # the log's steps inside the window: the engine's own count, give or take the window's edges
    assert abs(summary["steps"] - row["steps"]) <= 2 and summary["prefill_steps"] == 8 and summary["vision_graph_captures"] == 0


def test_bench_engine_transformers_baselines(tiny_checkpoint, tmp_path):
    """Both transformers rows (eager, static KV cache), and the static one's tokens per second
    measured after a warm-up of the same length (on the CPU transformers does not compile)."""
    out = tmp_path / "engine.json"
    run("bench_engine.py", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--precisions", "bf16",
        "--concurrency", "2", "--transformers-static", "--slots", "2", "--max-len", "512", "--out", str(out))  # fmt: skip
    rows = {r["system"]: r for r in json.loads(out.read_text())["results"]}
    assert {"transformers-eager", "transformers-static", "engine"} <= rows.keys(), rows.keys()
    assert all(r["output_tok_per_s"] > 0 and r["tpot_p50_ms"] > 0 for r in rows.values()), rows


def test_bench_preprocess(tmp_path):
    out = tmp_path / "preprocess.json"
    run("bench_preprocess.py", "--repeat", "2", "--out", str(out))
    rows = json.loads(out.read_text())["median_ms"]
    assert set(rows) >= {"preprocess, 448 px PNG", "PatchMaker, 448 px"} and all(ms > 0 for ms in rows.values())


def test_bench_detokenizer(tmp_path):
    out = tmp_path / "detokenizer.json"
    run("bench_detokenizer.py", "--repeat", "2", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["tokens"] > 100 and all(us > 0 for us in report["us_per_token"].values())


def test_bench_sampler(tmp_path):
    out = tmp_path / "sampler.json"
    run("bench_sampler.py", "--rows", "2", "--repeat", "1", "--out", str(out))
    assert json.loads(out.read_text())["median_ms"]["sample(), 2 rows, ms"] > 0


def test_bench_gpu_assembles_the_report_from_the_parts_a_run_left(tmp_path):
    """``--assemble`` runs nothing: the report comes from the parts' JSON beside --out (a run cut
    short at its Triton part, that part then run by hand: run 13). The parts here are written by
    the test, in the shape bench_engine.py and bench_triton.py write them."""
    row = {"ttft_p50_ms": 9.0, "ttft_p99_ms": 9.5, "tpot_p50_ms": 1.3, "output_tok_per_s": 700.0, "gpu_mem_gib": 16.6, "concurrency": 1}
    engine = {"machine": "GPU", "date": "2026-12-02", "command": "bench_engine.py ...", "torch": "2", "prompt_tokens": 243,
              "new_tokens": 128, "vision_ms_transformers_bf16": 16.0, "results": [{**row, "system": "engine+vision", "precision": "int8"}]}  # fmt: skip
    triton = {"command": "bench_triton.py --precision int8 ...", "repository_manifest_options": {"quant": "int8"},
              "ttft_breakdown": {"1": {"requests": 8}}, "results": [{**row, "system": "triton-grpc", "precision": "int8"}]}  # fmt: skip
    (tmp_path / "gpu.engine.json").write_text(json.dumps(engine))
    (tmp_path / "gpu.triton-int8.json").write_text(json.dumps(triton))
    run("bench_gpu.py", "--checkpoint", "unused", "--repository", "int8=unused", "--assemble", "--out", str(tmp_path / "gpu.json"))
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["system"] for r in report["results"]] == ["engine+vision", "triton-grpc"]
    assert report["date"] == "2026-12-02" and report["part_commands"] == [engine["command"], triton["command"]]
    assert report["repositories"] == {"int8": {"quant": "int8"}} and report["triton_ttft_breakdown"] == {"int8": {"1": {"requests": 8}}}


def test_step_log_summary_cuts_the_log_at_each_measured_load(tmp_path):
    """Lines as the engine writes them (engine/step_log.py), two loads of a bench_triton.py JSON;
    the step between the windows (warm-up) is in neither. The first load's lines are as logs
    were before they held the engine thread's CPU time."""
    line = lambda t, decoded, waits: {"t": t, "ms": {"decode": 3.0, "wait": 1.0}, "decoded": decoded,  # noqa: E731
                                      "prefilled": len(waits), "prefill_waits_ms": waits, "waiting": 2}  # fmt: skip
    with_cpu = lambda t, decoded, waits: {**line(t, decoded, waits), "cpu_ms": {"decode": 2.0, "wait": 0.9}}  # noqa: E731
    captured = {**with_cpu(15.0, 3, [1.0, 2.0, 30.0]), "captured_ms": 70.5}  # its prefill captured a vision graph
    steps = [line(10.0, 0, [5.0]), line(10.5, 1, []), line(11.0, 1, []), captured, with_cpu(19.0, 4, [])]
    (tmp_path / "steps.language_model_0.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    bench = {"command": "bench_triton.py ...", "results": [{"precision": "int8", "concurrency": 1, "monotonic_window_s": [10.0, 12.0]},
                                                            {"precision": "int8", "concurrency": 4, "monotonic_window_s": [14.0, 20.0]}]}  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    run("step_log_summary.py", str(tmp_path / "steps.language_model_0.jsonl"), "--bench", str(tmp_path / "bench.json"), "--out", str(tmp_path / "out.json"))
    one, four = json.loads((tmp_path / "out.json").read_text())["results"].values()
    assert (one["steps"], one["steps_per_s"], one["decoded_rows_mean"], one["prefill_steps"], one["prefill_wait_p50_ms"]) == (3, 1.5, 0.67, 1, 5.0)
    assert (four["steps"], four["prompts_per_prefill"], four["prefill_wait_p50_ms"], four["prefill_wait_p99_ms"]) == (2, 3, 2.0, 30.0)
    assert four["phase_ms_per_step"] == {"decode": 3.0, "wait": 1.0}
    # off the CPU: the host phases' wall time less the thread's CPU time ("wait" left out)
    assert (one["host_off_cpu_ms_per_step"], four["host_off_cpu_ms_per_step"]) == (None, {"decode": 1.0})
    # the prefill at 15 s and the step after it (to 19 s, then the window's end at 20): 5 of 6 s
    assert four["prefill_and_next_step_share"] == round(5 / 6, 3) and four["prefills_by_prompts"] == {"3": {"steps": 1, "launch_ms": 0.0, "next_step_ms": 4.0}}
    assert (one["vision_graph_captures"], four["vision_graph_captures"], four["vision_graph_capture_ms"]) == (0, 1, 70.5)


@pytest.mark.parametrize("script", ["bench_matmul.py", "bench_decode_matmul.py", "profile_prefill.py", "profile_decode.py"])
def test_gpu_only_scripts_import_and_parse_their_arguments(script):
    """They run on the GPU machine only; here at least their imports and argument parsers."""
    run(script, "--help")
