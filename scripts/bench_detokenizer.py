"""CPU cost per token of the engine's streaming detokenizer, with the real Qwen3-VL tokenizer.

    python scripts/bench_detokenizer.py [--checkpoint DIR] [--repeat 20] [--out bench_detokenizer.json]

Times ``IncrementalDetokenizer.add`` over the tokens of a mixed text (English, Chinese, accents,
emoji, code), with and without a stop string, and, for scale, one ``tokenizer.decode`` of a
7-token window: what each token cost twice before the detokenizer used the Rust DecodeStream.
At 64 streams the engine pays this 64 times per decode step. Prints a table and writes JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload import checkpoint_cli, median_ms, write_table  # noqa: E402

from model_repository.qwen3vl_runtime.engine.detokenizer import IncrementalDetokenizer  # noqa: E402

TEXT = "The answer: 这是一个测试。 Ünïcödé, emoji 🙂🎉 and code: def f(x): return x ** 2\n" * 16


def main() -> int:
    return checkpoint_cli(__doc__, run, default_out="bench_detokenizer.json", repeat=20)


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
    write_table(args.out, (f"{len(ids)} tokens", "us per token"), "us_per_token", rows, tokens=len(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
