"""Write a random-weight Qwen3-VL checkpoint (tiny, or the full 2B architecture) for benchmarks.

    python scripts/make_checkpoint.py OUT [--full-size] [--dtype bfloat16]

Real tokenizer, chat template and processor files; weights drawn at random. The loading path of
everything downstream is the one a downloaded checkpoint takes.
"""

import argparse
import time
from pathlib import Path

from builder.checkpoint import make_demo_checkpoint

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", type=Path)
    p.add_argument("--full-size", action="store_true", help="the Qwen3-VL-2B architecture (2.1B parameters)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to draw the weights (cuda: seconds for the 2B)")
    args = p.parse_args()
    start = time.perf_counter()
    make_demo_checkpoint(args.output, full_size=args.full_size, seed=args.seed, dtype=args.dtype, device=args.device)
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
