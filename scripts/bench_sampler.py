"""Time of the engine's sampler for one step, with the generation config's default settings.

    python scripts/bench_sampler.py [--device cpu] [--rows 1 8 64] [--repeat 5] [--profile] [--out bench_sampler.json]

``engine.sampler.sample`` over bf16 logits of Qwen3-VL's vocabulary (151,936) for 1 / 8 / 64 rows
sampled as a request is by default (temperature 0.7, top-k 20, top-p 0.8), each row with its own
seeded generator, as the engine calls it once per step; on CUDA also the graphed sampler that a
graphed decode step's rows take (``engine.cuda_graphs.GraphedSampler``). On CUDA the time includes
a synchronize; ``--profile`` adds the kernels of one step at the last row count, eager and graphed,
and the ops that launched them. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import median_ms, write_table  # noqa: E402

from model_repository.qwen3vl_runtime.engine.request import SamplingParams  # noqa: E402
from model_repository.qwen3vl_runtime.engine.sampler import sample  # noqa: E402

VOCAB = 151936
DEFAULT = SamplingParams(temperature=0.7, top_k=20, top_p=0.8)  # Qwen3-VL-2B-Instruct's generation_config.json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench_sampler.json"))
    p.add_argument("--profile", action="store_true", help="CUDA: also the kernels of one step at the last row count, eager and graphed (torch.profiler)")
    args = p.parse_args()
    device = torch.device(args.device)
    rows, steps = {}, {}
    for count in args.rows:
        logits = torch.randn(count, VOCAB, generator=torch.Generator().manual_seed(count)).bfloat16().to(device)
        generators = [torch.Generator().manual_seed(i) for i in range(count)]

        def step():
            sample(logits, [DEFAULT] * count, generators)
            if device.type == "cuda":
                torch.cuda.synchronize()

        rows[f"sample(), {count} rows, ms"] = round(median_ms(step, args.repeat), 2)
        steps = {"eager": step}
        if device.type == "cuda":
            from model_repository.qwen3vl_runtime.engine.cuda_graphs import GraphedSampler

            graphed = GraphedSampler({count: logits}, max_rows=count)  # also where the engine samples eagerly

            def graphed_step():
                graphed(count, [DEFAULT] * count, generators)
                torch.cuda.synchronize()

            rows[f"graphed sampler, {count} rows, ms"] = round(median_ms(graphed_step, args.repeat), 3)
            steps["graphed"] = graphed_step
    profiles = {}
    if args.profile and device.type == "cuda":
        from profile_decode import kernel_profile, print_top_kernels

        for name, step in steps.items():
            profiles[name] = kernel_profile(step)
            print(f"{name} sampler, {args.rows[-1]} rows: {profiles[name]['kernel_ms_per_step']:.3f} ms of kernels in {profiles[name]['kernels_per_step']:.0f} launches")
            print_top_kernels(profiles[name])
    write_table(args.out, ("step", "median ms"), "median_ms", rows, device=str(device), threads=torch.get_num_threads(), profiles=profiles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
