"""Decoder engine alone vs transformers ``generate``, same GPU, same inputs, in one run.

    python scripts/bench_engine.py --checkpoint DIR [--out results.json] [--precisions bf16 int8 fp8]

Workload (the project's targets): one 448x448 image + ~40 text tokens through the checkpoint's
own chat template (246 prompt tokens), 128 new tokens (EOS ignored), concurrency 1, 4, 8, 64.
The engine runs closed-loop: each stream submits its next request when one finishes (after one
unmeasured wave of ``c`` requests at each concurrency ``c``); transformers
``generate`` runs one batch of ``c`` copies, eagerly, and with --transformers-static also with a
static KV cache whose decode step transformers compiles on CUDA (the issue's second baseline). Image
embeddings come from transformers' vision tower on the GPU (its time is reported apart); with
--vision-in-engine the engine encodes each request's image itself, as with build-repo
--vision-backend decoder (rows "engine+vision": the Triton path minus preprocessing and transport).
Prints a table and writes JSON: per (system, precision, concurrency) ttft_p50_ms, ttft_p99_ms,
tpot_p50_ms, output_tok_per_s, gpu_mem_gib, and the engine's own account of the measured window
(steps, ms per step by phase, prefills, vision graphs captured); with --step-log the engine's
per-step log too, which scripts/step_log_summary.py cuts at each row's monotonic_window_s.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import PROMPT, encoded_image  # noqa: E402

from builder.decoder_export import write_decoder, write_vision  # noqa: E402
from model_repository.qwen3vl_runtime.decoder_weights import load_text_model, load_vision_tower  # noqa: E402
from model_repository.qwen3vl_runtime.engine import Engine, SamplingParams, Sequence  # noqa: E402
from model_repository.qwen3vl_runtime.engine.runner import ModelRunner, PromptInputs  # noqa: E402
from model_repository.qwen3vl_runtime.engine.step_log import StepLog  # noqa: E402
from model_repository.qwen3vl_runtime.engine.vision import ImageEncoder, ImageInputs  # noqa: E402
from model_repository.qwen3vl_runtime.kv_cache import KV_CACHE_DTYPES, is_quantized  # noqa: E402
from model_repository.qwen3vl_runtime.patches import checkpoint_pixel_table  # noqa: E402
from model_repository.qwen3vl_runtime.preprocessing import PreprocessLimits, Preprocessor  # noqa: E402

NEW_TOKENS = 128
PRECISIONS = {"bf16": "none", "int8": "int8", "fp8": "fp8"}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def workload(checkpoint: Path):
    from PIL import Image

    image = encoded_image()
    pre = Preprocessor(checkpoint, PreprocessLimits(4096, 1024 * 1024, 65536, 4, 64_000_000), pixel_bytes=True)
    inputs = pre(PROMPT, [image])
    # transformers' side of the comparison takes the processor's floats (the same values).
    inputs["pixel_values"] = pre.patches.pixel_values(inputs["pixel_bytes"])
    inputs["image_grid_thw"] = pre.patches.make([Image.open(io.BytesIO(image)).convert("RGB")])[1]
    return inputs


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def vision_embeddings(checkpoint: Path, inputs: dict, device: str):
    """transformers' model (bf16), the image's embeddings from its tower, and the tower's median ms."""
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16).to(device).eval()
    pixel_values = torch.from_numpy(inputs["pixel_values"]).to(device, torch.bfloat16)
    grid = torch.from_numpy(inputs["image_grid_thw"]).to(device)
    times = []
    with torch.no_grad():
        for _ in range(6):
            sync()
            start = time.perf_counter()
            out = model.model.visual(pixel_values, grid_thw=grid)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    embeds, deepstack = out.pooler_output.float().cpu(), torch.stack(out.deepstack_features).float().cpu()
    return model, embeds, deepstack, statistics.median(times[1:])


def bench_transformers(model, inputs: dict, concurrency: int, device: str, static_cache: bool = False) -> dict:
    """``generate`` on one batch of ``concurrency`` copies of the request. static_cache: with a
    static KV cache, whose decode step transformers compiles itself on CUDA (torch.compile, once
    per cache shape): what a user would pick without a serving engine."""
    ids = torch.from_numpy(inputs["input_ids"])[None].to(device)
    pixel_values = torch.from_numpy(inputs["pixel_values"]).to(device, torch.bfloat16)
    batch = dict(
        input_ids=ids.repeat(concurrency, 1),
        attention_mask=torch.ones_like(ids).repeat(concurrency, 1),
        mm_token_type_ids=(ids == model.config.image_token_id).int().repeat(concurrency, 1),
        pixel_values=pixel_values.repeat(concurrency, 1),
        image_grid_thw=torch.from_numpy(inputs["image_grid_thw"]).to(device).repeat(concurrency, 1),
        do_sample=False,
    )
    if static_cache:
        batch["cache_implementation"] = "static"

    def timed(new_tokens: int) -> float:
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        sync()
        return time.perf_counter() - start

    # Warm-up. A static cache is sized by the generated length, and each size is its own compile:
    # warm up with the measured length (the one-token calls below run no decode step to compile).
    timed(NEW_TOKENS if static_cache else 2)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ttft = statistics.median(timed(1) for _ in range(3))
    total = timed(NEW_TOKENS)
    return {
        "ttft_p50_ms": ttft * 1e3,
        "ttft_p99_ms": ttft * 1e3,
        "tpot_p50_ms": (total - ttft) / (NEW_TOKENS - 1) * 1e3,
        "output_tok_per_s": concurrency * NEW_TOKENS / total,
        "gpu_mem_gib": peak_gib(),
    }


class ClosedLoop:
    """`concurrency` streams, each submitting its next request as soon as one finishes."""

    def __init__(self, engine: Engine, prompt: PromptInputs, prompt_len: int, rope_delta: int, params: SamplingParams):
        self.engine, self.prompt, self.prompt_len, self.rope_delta, self.params = engine, prompt, prompt_len, rope_delta, params

    def run(self, concurrency: int, requests: int) -> dict:
        records, lock, done = [], threading.Lock(), threading.Event()
        submitted = [0]

        def submit():
            with lock:
                if submitted[0] >= requests:
                    return
                submitted[0] += 1
            record = {"submit": time.perf_counter(), "times": []}

            def emit(out):
                record["times"].append(time.perf_counter())
                if out.error:
                    raise RuntimeError(out.error)
                if out.finish_reason:
                    with lock:
                        records.append(record)
                        if len(records) == requests:
                            done.set()
                    submit()

            self.engine.submit(Sequence(str(submitted[0]), self.prompt, self.prompt_len, self.rope_delta, self.params, emit))

        start = time.perf_counter()
        for _ in range(concurrency):
            submit()
        if not done.wait(600):
            raise TimeoutError("the engine did not finish")
        wall = time.perf_counter() - start
        ttft = [(r["times"][0] - r["submit"]) * 1e3 for r in records]
        tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) * 1e3 for r in records]
        return {
            "ttft_p50_ms": percentile(ttft, 50),
            "ttft_p99_ms": percentile(ttft, 99),
            "tpot_p50_ms": percentile(tpot, 50),
            "output_tok_per_s": sum(len(r["times"]) for r in records) / wall,
            # perf_counter, the step log's clock: step_log_summary.py cuts the log at this window
            "monotonic_window_s": [start, start + wall],
        }


def request_params(checkpoint: Path, sampled: bool) -> SamplingParams:
    """Greedy, or the checkpoint's generation-config sampling (what a request gets by default from
    the server: temperature 0.7, top-k 20, top-p 0.8 for Qwen3-VL-2B-Instruct); EOS ignored."""
    if not sampled:
        return SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    return SamplingParams.from_generation_config(generation, max_tokens=NEW_TOKENS, ignore_eos=True)


def bench_engine(checkpoint: Path, precision: str, prompt: PromptInputs, inputs: dict, args) -> list[dict]:
    from transformers import AutoTokenizer

    slots = args.slots
    with tempfile.TemporaryDirectory() as folder:
        write_decoder(checkpoint, Path(folder), quantization=PRECISIONS[precision], dtype="bfloat16")
        if args.vision_in_engine:  # the tower's weights as build-repo writes them for this precision
            vision_mode = "none" if PRECISIONS[precision] == "none" else "int8"
            write_vision(checkpoint, Path(folder), quantization=vision_mode, dtype="bfloat16")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = load_text_model(Path(folder), args.device)
        visual = load_vision_tower(Path(folder), args.device) if args.vision_in_engine else None
    # build-repo --vision-graph-sizes 448x448: every bucket of the request's image captured at start.
    graph_grids = (tuple(int(n) for n in inputs["image_grid_thw"][0]),) if args.vision_graphs_at_start else ()
    start = time.perf_counter()
    runner = ModelRunner(
        model, num_slots=slots, max_len=args.max_len, image_token_id=151655, graphed_prefill=args.graphed_prefill,
        quantized_kv=is_quantized(args.kv_cache_dtype),
        vision=ImageEncoder(visual, checkpoint_pixel_table(checkpoint), graph_grids=graph_grids) if visual is not None else None,
    )  # fmt: skip
    startup = time.perf_counter() - start
    step_log = StepLog(f"{args.step_log}.{precision}.jsonl") if args.step_log else None
    engine = Engine(runner, AutoTokenizer.from_pretrained(checkpoint), eos_token_ids={151645}, num_slots=slots, step_log=step_log).start()
    loop = ClosedLoop(engine, prompt, len(inputs["input_ids"]), int(inputs["rope_delta"][0]), request_params(checkpoint, args.sampled))
    loop.run(2, 4)  # warm-up
    rows = []
    try:
        for c in args.concurrency:
            # One unmeasured wave of c requests first: the first time c images arrive together the
            # vision tower captures a CUDA graph for that many (a once-per-server cost, kept as
            # first_wave_*). Without it, run 13's rows at 4-64 streams had first-token p99s of
            # 323-434 ms against p50s of 44-93 (the capture's share not measured apart). The wave
            # only captures the buckets its arrivals happen to form: the measured window counts
            # its own captures (vision_graph_captures); --vision-graphs-at-start leaves none.
            first_wave = loop.run(c, c)
            totals = engine.metrics.step_totals()
            result = loop.run(c, max(3 * c, args.min_requests))
            result.update(first_wave_ttft_p99_ms=first_wave["ttft_p99_ms"], first_wave_tok_per_s=first_wave["output_tok_per_s"])
            result.update(engine.metrics.step_totals().since(totals))
            system = "engine+vision" if args.vision_in_engine else "engine"
            result.update(system=system, precision=precision, concurrency=c, startup_s=startup, sampled=args.sampled, kv_cache_dtype=args.kv_cache_dtype)
            result["gpu_mem_gib"] = peak_gib()
            rows.append(result)
            print(_row(result), flush=True)
            print(f"|   steps {result['steps']}, ms per step: {result['phase_ms_per_step']}; {result['prefill_steps']} prefills of "
                  f"{result['prompts_per_prefill']} prompts on average; vision graphs captured: {result['vision_graph_captures']} "
                  f"({result['vision_graph_capture_ms']} ms)", flush=True)  # fmt: skip
    finally:
        engine.stop()
        del engine, runner, model, loop
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _row(r: dict) -> str:
    return (
        f"| {r['system']:<22} | {r['precision']:<5} | {r['concurrency']:>3} | {r['ttft_p50_ms']:8.1f} | "
        f"{r['ttft_p99_ms']:8.1f} | {r['tpot_p50_ms']:7.2f} | {r['output_tok_per_s']:9.0f} | {r['gpu_mem_gib']:6.2f} |"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench_engine.json"))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8, 64])
    p.add_argument("--slots", type=int, default=64, help="KV slots (sequences decoded together)")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per KV slot")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--transformers-static", action="store_true",
                   help="also transformers with a static KV cache, its decode step compiled on CUDA (minutes of compiling per concurrency)")
    p.add_argument("--device", default="cuda", help="cpu runs the same code slowly (a smoke test)")
    p.add_argument("--graphed-prefill", action="store_true", help="replay short prompts' prefill from CUDA graphs")
    p.add_argument("--vision-in-engine", action="store_true", help="the engine encodes the image (--vision-backend decoder)")
    p.add_argument("--vision-graphs-at-start", action="store_true",
                   help="with --vision-in-engine: capture the tower's graphs for the image's size at start, every bucket "
                        "(build-repo --vision-graph-sizes 448x448), so that none is captured inside a measurement")  # fmt: skip
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help="the engine's KV cache (build-repo --kv-cache-dtype)")
    p.add_argument("--min-requests", type=int, default=8,
                   help="measured requests at each concurrency c: max(3c, this); at 4 streams the default's 12 take 0.7 s on an H100, "
                        "where one stall of 80 ms is a tenth")  # fmt: skip
    p.add_argument("--step-log", metavar="PREFIX",
                   help="the engine's step log, PREFIX.<precision>.jsonl (scripts/step_log_summary.py PREFIX.*.jsonl --bench OUT)")
    p.add_argument("--sampled", action="store_true", help="the engine's requests sample as the generation config says (default: greedy)")
    args = p.parse_args()

    inputs = workload(args.checkpoint)
    hf, embeds, deepstack, vision_ms = vision_embeddings(args.checkpoint, inputs, args.device)
    ids, positions = torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["position_ids"])
    if args.vision_in_engine:
        prompt = PromptInputs(ids, positions, images=ImageInputs.from_arrays(inputs))
    else:
        prompt = PromptInputs(ids, positions, embeds, deepstack)
    print(f"prompt {len(inputs['input_ids'])} tokens; vision tower (transformers bf16 eager): {vision_ms:.1f} ms")
    print("| system                 | prec  |   c | TTFT p50 | TTFT p99 | TPOT ms |    tok/s | GiB    |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    baselines = [] if args.skip_transformers else [("transformers-eager", False)]
    if args.transformers_static and not args.skip_transformers:
        baselines.append(("transformers-static", True))
    for system, static_cache in baselines:
        for c in args.concurrency:
            result = bench_transformers(hf, inputs, c, args.device, static_cache)
            result.update(system=system, precision="bf16", concurrency=c)
            rows.append(result)
            print(_row(result), flush=True)
    del hf
    report = {
        "machine": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "prompt_tokens": len(inputs["input_ids"]),
        "new_tokens": NEW_TOKENS,
        "vision_ms_transformers_bf16": vision_ms,
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for precision in args.precisions:  # the JSON is rewritten after each precision: a crash keeps the rest
        rows += bench_engine(args.checkpoint, precision, prompt, inputs, args)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
