"""The decoder's and the vision tower's matrix products: bf16 (cuBLAS) vs the 8-bit kernels, by row count.

    python scripts/bench_matmul.py [--out matmul.json] [--rows 1 16 64 784 3136 4096]

Weight shapes are Qwen3-VL-2B's (text: fused q/k/v, o, fused gate/up, down, the tied lm_head;
vision: qkv, proj, fc1, fc2). One row is a decode step of one stream; 64 a full decode batch;
784 one 448 px image's patches; 3,136 and 4,096 a prefill of many prompts or images. Prints, per
shape and row count, the median milliseconds of each kernel (triton.testing.do_bench) and the
8-bit kernels' speed-up over bf16, and writes JSON. GPU only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import write_gpu_report  # noqa: E402

from model_repository.qwen3vl_runtime.gpu import _fast_matmul  # noqa: E402
from model_repository.qwen3vl_runtime.quant import quantize_weight  # noqa: E402

SHAPES = {  # name -> (N, K) of the weight [out, in]
    "text.qkv": (4096, 2048),
    "text.o": (2048, 2048),
    "text.gate_up": (12288, 2048),
    "text.down": (2048, 6144),
    "text.lm_head": (151936, 2048),
    "vision.qkv": (3072, 1024),
    "vision.proj": (1024, 1024),
    "vision.fc1": (4096, 1024),
    "vision.fc2": (1024, 4096),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_matmul.json"))
    p.add_argument("--rows", nargs="+", type=int, default=[1, 16, 64, 784, 3136, 4096])
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_matmul.py needs a CUDA GPU")
    from triton.testing import do_bench

    rows = []
    print("| weight | N x K | rows | bf16 ms | int8 ms | fp8 ms | int8 speed-up | fp8 speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda") / k**0.5
        dense = weight.bfloat16()
        quantized = {mode: quantize_weight(weight, mode) for mode in ("int8", "fp8")}
        for m in args.rows:
            if name == "text.lm_head" and m > 64:
                continue  # the head only sees each prompt's last row
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"weight": name, "n": n, "k": k, "rows": m, "bf16_ms": do_bench(lambda: x @ dense.T)}
            for mode, (q, scale) in quantized.items():
                kernel = _fast_matmul(q.dtype)
                row[f"{mode}_ms"] = do_bench(lambda: kernel(x, q, scale))
            rows.append(row)
            print(
                f"| {name} | {n} x {k} | {m} | {row['bf16_ms']:.4f} | {row['int8_ms']:.4f} | {row['fp8_ms']:.4f} | "
                f"{row['bf16_ms'] / row['int8_ms']:.2f} | {row['bf16_ms'] / row['fp8_ms']:.2f} |",
                flush=True,
            )
    write_gpu_report(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
