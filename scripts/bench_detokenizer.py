"""CPU cost per token of the engine's streaming detokenizer, with the real Qwen3-VL tokenizer.

    python scripts/bench_detokenizer.py [--checkpoint DIR] [--repeat 20] [--out bench_detokenizer.json]

Times ``IncrementalDetokenizer.add`` over the tokens of a mixed text (English, Chinese, accents,
emoji, code), with and without a stop string, and, for scale, one ``tokenizer.decode`` of a
7-token window: what each token cost twice before the detokenizer used the Rust DecodeStream.
At 64 streams the engine pays this 64 times per decode step. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_preprocess import median_ms  # noqa: E402

from builder.checkpoint import make_demo_checkpoint  # noqa: E402
from model_repository.qwen3vl_runtime.engine.detokenizer import IncrementalDetokenizer  # noqa: E402

TEXT = "The answer: 这是一个测试。 Ünïcödé, emoji 🙂🎉 and code: def f(x): return x ** 2\n" * 16


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (tokenizer); default: the demo's files")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("bench_detokenizer.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        return run(args.checkpoint or make_demo_checkpoint(Path(tmp)), args)


def run(checkpoint: Path, args) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer(TEXT)["input_ids"]

    def stream(stop=()):
        detok = IncrementalDetokenizer(tokenizer, stop)
        for token in ids:
            detok.add(token)

    per_token = {
        "IncrementalDetokenizer.add": median_ms(stream, args.repeat) / len(ids) * 1e3,
        "IncrementalDetokenizer.add, one stop string": median_ms(lambda: stream(("never there",)), args.repeat) / len(ids) * 1e3,
        "tokenizer.decode of a 7-token window (once)": median_ms(lambda: tokenizer.decode(ids[100:107], skip_special_tokens=True), 200) * 1e3,
    }
    rows = {name: round(us, 2) for name, us in per_token.items()}
    print(f"| {len(ids)} tokens | us per token |\n|---|---|")
    for name, us in rows.items():
        print(f"| {name} | {us} |")
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "command": " ".join(sys.argv),
        "tokens": len(ids),
        "us_per_token": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
