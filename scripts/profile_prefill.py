"""Where a prefill's time goes on the GPU: the vision tower, the text prefill, kernels vs the rest.

    python scripts/profile_prefill.py --checkpoint DIR [--precisions bf16 int8 fp8] [--prompts 1 16]

The engine's runner with the vision tower in its process (build-repo --vision-backend decoder),
prefilling N copies of the benchmark request (one 448 px image + ~40 text tokens) in one call, as
the engine does when N requests arrive together. For each precision and N: the median wall time of
the whole prefill, of the vision tower alone (as the engine runs it, from CUDA graphs, and eagerly)
and of copying the pixels to the GPU (the encoder's own copy, through pinned memory; runs 6 and 7
timed a plain pageable copy instead), then the GPU
time of the prefill's kernels (torch.profiler), their count and the most costly ones. Wall time
far above kernel time means the step waits on the host (launches, Python), not on the GPU.

--graphed-prefill also captures the prefill graphs (``GraphedPrefill``, build-repo
--graphed-prefill) on the same runner, reports their capture time and GPU memory, and times each
prompt count replayed from them beside the eager prefill (``graphed_prefill_ms``; eager where the
prompts do not fit a graph).
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_engine import workload  # noqa: E402
from profile_decode import PRECISIONS, kernel_profile, print_top_kernels, profile_arguments  # noqa: E402

from builder.decoder_export import write_decoder, write_vision  # noqa: E402
from model_repository.qwen3vl_runtime.decoder_weights import load_text_model, load_vision_tower  # noqa: E402
from model_repository.qwen3vl_runtime.engine import SamplingParams, Sequence  # noqa: E402
from model_repository.qwen3vl_runtime.engine.runner import ModelRunner, PromptInputs  # noqa: E402
from model_repository.qwen3vl_runtime.engine.vision import ImageEncoder, ImageInputs  # noqa: E402
from model_repository.qwen3vl_runtime.host_to_device import to_device  # noqa: E402
from model_repository.qwen3vl_runtime.patches import checkpoint_pixel_table  # noqa: E402


def wall_ms(run, repeats: int = 10) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profile(precision: str, args, prompt: PromptInputs, image: ImageInputs) -> list[dict]:
    """One row per prompt count for one precision (the runner is freed when this returns)."""
    with tempfile.TemporaryDirectory() as folder:
        write_decoder(args.checkpoint, Path(folder), quantization=PRECISIONS[precision], dtype="bfloat16")
        write_vision(args.checkpoint, Path(folder), quantization="none" if precision == "bf16" else "int8", dtype="bfloat16")
        model, visual = load_text_model(Path(folder), "cuda"), load_vision_tower(Path(folder), "cuda")
    runner = ModelRunner(model, num_slots=max(args.prompts), max_len=2048, image_token_id=151655, vision=ImageEncoder(visual, checkpoint_pixel_table(args.checkpoint)))
    graphs, capture = capture_prefill_graphs(runner, scratch_slot=max(args.prompts)) if args.graphed_prefill else (None, {})
    tokens, rows = len(prompt.input_ids), []
    for n in args.prompts:
        seqs = [Sequence(str(i), prompt, tokens, 0, SamplingParams(), lambda out: None, slot=i) for i in range(n)]
        row = {
            "precision": precision,
            "prompts": n,
            "prefill_ms": wall_ms(lambda: runner.prefill(seqs)),
            "vision_ms": wall_ms(lambda: runner.vision([image] * n)),
            "vision_eager_ms": wall_ms(lambda: runner.vision.encode_eager([image] * n)),
            "pixels_to_gpu_ms": wall_ms(lambda: to_device([image.pixel_bytes] * n, runner.device)),
        }
        if graphs is not None:
            runner.prefill_graphs = graphs
            row.update(capture, graphed_prefill_ms=wall_ms(lambda: runner.prefill(seqs)))
            runner.prefill_graphs = None  # the kernel profile below is of the eager prefill
        row.update(kernel_profile(lambda: runner.prefill(seqs)))
        rows.append(row)
        print(
            f"{precision:5} {n:3} prompts: prefill {row['prefill_ms']:.2f} ms (vision {row['vision_ms']:.2f}, eager "
            f"{row['vision_eager_ms']:.2f}, "
            f"pixels to GPU {row['pixels_to_gpu_ms']:.2f}); kernels {row['kernel_ms_per_step']:.2f} ms in "
            f"{row['kernels_per_step']:.0f} launches" + (f"; from the prefill graphs {row['graphed_prefill_ms']:.2f} ms" if graphs is not None else ""),
            flush=True,
        )
        print_top_kernels(row)
    return rows


def capture_prefill_graphs(runner: ModelRunner, scratch_slot: int):
    """(prefill graphs for the runner, not yet set on it; their capture time and GPU memory)."""
    from model_repository.qwen3vl_runtime.engine.cuda_graphs import GraphedPrefill

    torch.cuda.synchronize()
    before, start = torch.cuda.memory_reserved(), time.perf_counter()
    graphs = GraphedPrefill(runner.model, runner.kv, scratch_slot=scratch_slot)
    torch.cuda.synchronize()
    out = {"prefill_graphs_capture_s": round(time.perf_counter() - start, 2),
           "prefill_graphs_gib": round((torch.cuda.memory_reserved() - before) / 2**30, 3),
           "prefill_graph_buckets": list(graphs.TOKEN_BUCKETS)}  # fmt: skip
    print(f"prefill graphs: {out}", flush=True)
    return graphs, out


def main() -> int:
    p = profile_arguments(__doc__, "profile_prefill.json")
    p.add_argument("--prompts", nargs="+", type=int, default=[1, 16])
    p.add_argument("--graphed-prefill", action="store_true", help="also time the prefill replayed from CUDA graphs (build-repo --graphed-prefill)")
    args = p.parse_args()
    inputs = workload(args.checkpoint)
    ids, positions = torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["position_ids"])
    image = ImageInputs.from_arrays(inputs)
    prompt = PromptInputs(ids, positions, images=image)
    report = {"machine": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "prompt_tokens": len(ids), "results": []}
    for precision in args.precisions:
        report["results"] += profile(precision, args, prompt, image)
        torch.cuda.empty_cache()  # the runner of that precision went with profile()'s frame
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
