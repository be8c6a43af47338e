"""Where a decode step's time goes on the GPU: graph replay vs kernels vs the engine's host work.

    python scripts/profile_decode.py --checkpoint DIR [--precisions bf16 int8 fp8] [--out profile.json]

For each precision, KV cache dtype (--kv-cache-dtypes auto int8) and batch size: the median time
of one CUDA-graph replay of the fused decode step, the sum of its kernels' GPU time
(torch.profiler), their count, and the ten most costly kernels. The floor is the bytes a step
reads, the weights' and the cached keys and values' (batch x --context tokens), over the copy
bandwidth (~3 TB/s on an H100).
``QWEN3VL_PDL=0`` in the environment profiles the kernels launched without programmatic dependent
launch (``kernels/pdl.py``), for an A/B comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_engine import PRECISIONS  # noqa: E402

from builder.decoder_export import write_decoder  # noqa: E402
from model_repository.qwen3vl_runtime.decoder_weights import load_text_model  # noqa: E402
from model_repository.qwen3vl_runtime.engine.runner import ModelRunner  # noqa: E402
from model_repository.qwen3vl_runtime.kernels import pdl  # noqa: E402
from model_repository.qwen3vl_runtime.kv_cache import KV_CACHE_DTYPES, is_quantized  # noqa: E402


def replay_ms(graphed, batch: int, context: int, repeats: int = 50) -> float:
    lengths, slots = decode_inputs(batch, context)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        graphed(lengths, slots, lengths)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def kernel_profile(run, repeats: int = 5) -> dict:
    """GPU time of the kernels one ``run()`` launches (torch.profiler, mean of ``repeats``), and
    which PyTorch ops launched them: ``ops`` ranks (op, input shapes) by the GPU time of the kernels
    each launched itself, so an elementwise kernel is told apart by the ``aten::mul`` / ``add`` /
    ``cat`` and the shapes behind it (kernels launched by Triton or replayed graphs have no op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.key_averages() if e.device_type.name == "CUDA"), key=lambda e: e.self_device_time_total, reverse=True)
    ops = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.device_type.name == "CPU" and e.self_device_time_total > 0),
                 key=lambda e: e.self_device_time_total, reverse=True)  # fmt: skip
    total_us = sum(e.self_device_time_total for e in kernels) / repeats
    return {
        "kernel_ms_per_step": total_us / 1e3,
        "kernels_per_step": sum(e.count for e in kernels) / repeats,
        "top": [(e.key[:160], round(e.self_device_time_total / repeats / 1e3, 4), e.count // repeats) for e in kernels[:12]],
        "ops": [(f"{e.key} {e.input_shapes}"[:200], round(e.self_device_time_total / repeats / 1e3, 4), e.count // repeats) for e in ops[:15]],
    }


def print_top_kernels(row: dict) -> None:
    for name, ms, count in row["top"]:
        print(f"    {ms:8.4f} ms  x{count:<5} {name}")
    print("    by the op that launched them:")
    for name, ms, count in row["ops"]:
        print(f"    {ms:8.4f} ms  x{count:<5} {name}")


def decode_inputs(batch: int, context: int):
    """(lengths, slots) of a decode step: `context` cached tokens in each of slots 0..batch-1."""
    return torch.full((batch,), context), torch.arange(batch)


def prefill_ms(runner, count: int, tokens: int = 243, repeats: int = 10) -> float:
    """Median time of one batched prefill of `count` text prompts of `tokens` tokens."""
    from model_repository.qwen3vl_runtime.engine import SamplingParams, Sequence
    from model_repository.qwen3vl_runtime.engine.runner import PromptInputs

    seqs = []
    for slot in range(count):
        ids = torch.randint(100, 5000, (tokens,))
        prompt = PromptInputs(ids, torch.arange(tokens).expand(3, -1))
        seqs.append(Sequence(str(slot), prompt, tokens, 0, SamplingParams(), lambda out: None, slot=slot))
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        runner.prefill(seqs)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profile(precision: str, args) -> list[dict]:
    """Prefill times and one row per decode batch size for one precision, per KV cache dtype (one
    load of the weights, a runner for each cache)."""
    with tempfile.TemporaryDirectory() as folder:
        write_decoder(args.checkpoint, Path(folder), quantization=PRECISIONS[precision], dtype="bfloat16")
        model = load_text_model(Path(folder), "cuda")
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    rows = []
    for kv_cache in args.kv_cache_dtypes:
        rows += profile_cache(model, weight_bytes, precision, kv_cache, args)
        torch.cuda.empty_cache()  # the runner went with profile_cache()'s frame
    return rows


def profile_cache(model, weight_bytes: int, precision: str, kv_cache: str, args) -> list[dict]:
    prefill_counts = (1, 8)
    # a slot per prompt of the prefills too: with fewer, the 8-prompt prefill wrote past the KV pool
    # (`--batches 1` failed in cuDNN's attention, run 13)
    runner = ModelRunner(model, num_slots=max(*args.batches, *prefill_counts), max_len=2048, image_token_id=151655, quantized_kv=is_quantized(kv_cache))
    # The keys and values (and scales) one decode step reads per sequence and cached token, all layers.
    slots, _, max_len, _ = runner.kv[0].k.shape
    kv_token_bytes = sum(layer.nbytes() for layer in runner.kv) / (slots * max_len)
    rows = []
    for count in prefill_counts:
        ms = prefill_ms(runner, count)
        rows.append({"precision": precision, "kv_cache_dtype": kv_cache, "prefill_prompts": count, "prefill_ms": ms})
        print(f"{precision:5} KV {kv_cache:4} prefill of {count} x 243-token prompts: {ms:.2f} ms", flush=True)
    for batch in args.batches:
        row = {"precision": precision, "kv_cache_dtype": kv_cache, "batch": batch, "weights_gb": weight_bytes / 1e9,
               "kv_read_gb": batch * args.context * kv_token_bytes / 1e9, "pdl": pdl.enabled(torch.device("cuda"))}  # fmt: skip
        row["replay_ms"] = replay_ms(runner.graphed_decode, batch, args.context)
        lengths, slots = decode_inputs(batch, args.context)
        row.update(kernel_profile(lambda: runner.graphed_decode(lengths, slots, lengths)))
        rows.append(row)
        print(
            f"{precision:5} KV {kv_cache:4} b={batch:3} (PDL {'on' if row['pdl'] else 'off'}): replay {row['replay_ms']:.3f} ms, "
            f"kernels {row['kernel_ms_per_step']:.3f} ms in {row['kernels_per_step']:.0f} launches, weights {row['weights_gb']:.2f} GB "
            f"+ KV {row['kv_read_gb']:.2f} GB (floor {(row['weights_gb'] + row['kv_read_gb']) / 3.0:.3f} ms at 3 TB/s)",
            flush=True,
        )
        print_top_kernels(row)
    return rows


def profile_arguments(doc: str, out: str) -> argparse.ArgumentParser:
    """What the profile scripts all take: the checkpoint, the precisions, the JSON to write."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--out", type=Path, default=Path(out))
    return p


def main() -> int:
    p = profile_arguments(__doc__, "profile_decode.json")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--context", type=int, default=300, help="cached tokens per sequence")
    p.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"], choices=KV_CACHE_DTYPES, help="each one profiled (build-repo --kv-cache-dtype)")
    args = p.parse_args()
    report = {"machine": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "results": []}
    for precision in args.precisions:
        report["results"] += profile(precision, args)
        torch.cuda.empty_cache()  # that precision's weights went with profile()'s frame
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
