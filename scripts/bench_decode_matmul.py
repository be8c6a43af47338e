"""The decode step's 8-bit products as the engine picks them, against cuBLAS on bf16 weights.

    python scripts/bench_decode_matmul.py [--rows 1 4 8 16 64] [--modes int8 fp8] [--out decode_matmul.json]
    python scripts/bench_decode_matmul.py --rows 64 --modes int8 --sweep --weights text.qkv text.gate_up
    python scripts/bench_decode_matmul.py --rows 256 1024 4096 --modes int8    # prefill sizes

--sweep times a grid of int8 tiles (both tensor-core kernels, the "f16_ptx" conversion or with
--sweep-convert int8x2 the two int8 terms, tiles of 32-256 weight rows by 64-256 of K, 4 or 8 warps,
3 or 4 stages (int8x2: 3-5), split over K where the grid leaves SMs idle) instead of the tuner's
candidates, and prints each shape's five fastest: where to look for tiles the candidates lack.

For Qwen3-VL-2B's text weights (fused q/k/v, o, fused gate/up, down, the tied lm_head) and each
row count of a decode batch, the 8-bit kernel's tuner (``kernels/int8_matmul.tune``) measures
every candidate launch (kernel, tile, weight conversion, split of K) the way the engine runs it:
replays of a CUDA graph over copies of the weight that do not fit in L2 (``graph_timing``), so
neither Python's launch cost nor a cached weight shows. Prints, per shape: cuBLAS bf16, the tuner's pick, the best
of each kernel/conversion family, the weight bandwidth of the pick; then per-token sums (28 layers
+ lm_head) and the candidates that did not run; writes every timing to JSON. GPU only.

Rows above DECODE_MAX_ROWS are a prefill's: int8 only (fp8 prefills run W8A8 in cuBLASLt, not
tuned), no lm_head (it sees each prompt's last row only), the sums per pass of 28 layers, and
"before" is "dequantize" (W in bf16 for the call, then cuBLAS).

Run 9 (docs/benchmarks.md) swept a wider set of tiles with the first version of this script;
its JSON lists them. The tuner's candidates are that sweep's winners plus the fp16 conversions.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, fields
from itertools import product
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_matmul import SHAPES  # noqa: E402
from workload import write_gpu_report  # noqa: E402

from model_repository.qwen3vl_runtime.gpu import _fast_matmul  # noqa: E402
from model_repository.qwen3vl_runtime.kernels import int8_matmul as kernels  # noqa: E402
from model_repository.qwen3vl_runtime.kernels.graph_timing import graph_ms, rotating  # noqa: E402
from model_repository.qwen3vl_runtime.quant import quantize_weight  # noqa: E402

TEXT = {name: shape for name, shape in SHAPES.items() if name.startswith("text.")}
os.environ["QWEN3VL_TUNING_CACHE"] = ""  # every candidate timed here, none taken from an earlier start
LAYERS = 28


def measure(name: str, n: int, k: int, m: int, mode: str) -> dict:
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda") / k**0.5
    q, scale = quantize_weight(weight, mode)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    dense = rotating(weight.bfloat16())
    row = {"weight": name, "n": n, "k": k, "rows": m, "mode": mode,
           "bf16_ms": graph_ms([lambda w=w: torch.matmul(x, w.T, out=out) for w in dense])}  # fmt: skip
    del dense
    with kernels.tuning_prefills():
        _fast_matmul(q.dtype)(x, q, scale)  # tunes this key, as the engine's warm-up does
    tuning = kernels.TUNED[(kernels.rows_bucket(m), n, k, q.dtype, x.dtype)]
    row["best"] = asdict(tuning.best)
    row["best_ms"] = next(ms for launch, ms, _ in tuning.timings if launch == tuning.best)
    row["candidates"] = [{**asdict(launch), "ms": ms, "problem": problem} for launch, ms, problem in tuning.timings]
    families: dict[str, float] = {}
    for launch, ms, _ in tuning.timings:
        if ms is not None:
            families[launch.family] = min(ms, families.get(launch.family, ms))
    row["best_by_family_ms"] = families
    return row


def sweep_grid(convert: str):
    """The --sweep grid, in place of ``kernels.candidates`` (int8 only), for one weight conversion."""

    def sweep_candidates(bucket: int, weight_dtype: torch.dtype, n: int = 0, k: int = 0, sms: int = 0) -> list[kernels.Launch]:
        # int8x2: BLOCK_K is the terms' group (at most TERMS_MAX_GROUP); stages to 5, the tiles being bytes
        stages = (3, 4, 5) if convert == "int8x2" else (3, 4)
        tiles = product(("tensor_cores", "weight_major"), (32, 64, 128, 256), (64, 128, 256), (4, 8), stages)
        whole = [kernels.Launch(kernel, max(16, bucket), block_n, block_k, warps, stages, convert)
                 for kernel, block_n, block_k, warps, stages in tiles
                 if block_n * block_k <= 128 * 256]  # fmt: skip  (larger: over the shared memory at 3-4 stages)
        return kernels.with_splits(whole, bucket, n, k, sms)

    return sweep_candidates


def launch_of(timing: dict) -> kernels.Launch:
    """The launch of one of the JSON's candidate timings (its fields, without "ms" and "problem")."""
    return kernels.Launch(**{f.name: timing[f.name] for f in fields(kernels.Launch)})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 16, 64])
    p.add_argument("--modes", nargs="+", default=["int8", "fp8"], choices=["int8", "fp8"])
    p.add_argument("--out", type=Path, default=Path("decode_matmul.json"))
    p.add_argument("--weights", nargs="+", choices=list(TEXT), default=list(TEXT))
    p.add_argument("--sweep", action="store_true", help="time a grid of int8 tiles instead of the tuner's candidates")
    p.add_argument("--sweep-convert", default="f16_ptx", choices=["f16_ptx", "int8x2"], help="the weight conversion of the --sweep grid")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode_matmul.py needs a CUDA GPU")
    if args.sweep:
        if args.modes != ["int8"]:
            sys.exit("--sweep is for --modes int8")
        kernels.candidates = sweep_grid(args.sweep_convert)
    results = []
    print("| mode | weight | rows | bf16 us | pick us | pick | GB/s | best per family us |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        for m in args.rows:
            for name in args.weights:
                if m > kernels.DECODE_MAX_ROWS and (mode != "int8" or name == "text.lm_head"):
                    continue
                n, k = TEXT[name]
                r = measure(name, n, k, m, mode)
                results.append(r)
                if "best" not in r:
                    continue
                if args.sweep:
                    timed = sorted((c for c in r["candidates"] if c["ms"] is not None), key=lambda c: c["ms"])
                    fastest = "; ".join(f"{launch_of(c).label} {c['ms'] * 1e3:.1f}" for c in timed[:5])
                    print(f"    fastest of {len(r['candidates'])}: {fastest}", flush=True)
                pick = kernels.Launch(**r["best"]).label
                families = ", ".join(f"{f} {ms * 1e3:.1f}" for f, ms in sorted(r["best_by_family_ms"].items()))
                print(
                    f"| {mode} | {name} | {m} | {r['bf16_ms'] * 1e3:.1f} | {r['best_ms'] * 1e3:.1f} | {pick} | "
                    f"{n * k / r['best_ms'] / 1e6:.0f} | {families} |",
                    flush=True,
                )
    print("\nPer token (28 layers + lm_head) or, above DECODE_MAX_ROWS rows, per prefill pass (28 layers), ms:")
    print("| mode | rows | bf16 | 8-bit as picked | 8-bit before: the bf16 conversion (decode) or dequantize (prefill) |")
    print("|---|---|---|---|---|")
    for mode in args.modes:
        for m in args.rows:
            rs = [r for r in results if r["mode"] == mode and r["rows"] == m and "best" in r]
            prefill = m > kernels.DECODE_MAX_ROWS
            if len(rs) != len(TEXT) - prefill:
                continue
            times = lambda key: sum((1 if r["weight"] == "text.lm_head" else LAYERS) * key(r) for r in rs)  # noqa: E731
            before = times(lambda r: r["best_by_family_ms"].get("dequantize" if prefill else "tc/bf16", float("nan")))
            print(f"| {mode} | {m} | {times(lambda r: r['bf16_ms']):.3f} | {times(lambda r: r['best_ms']):.3f} | {before:.3f} |")
    problems = {(c["kernel"], c["convert"], c["problem"]) for r in results for c in r.get("candidates", []) if c["problem"]}
    for kernel, convert, problem in sorted(problems):
        print(f"did not run: {kernel}/{convert}: {problem}")
    write_gpu_report(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
