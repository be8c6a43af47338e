"""The real perf_analyzer against the streaming ensemble: input data of prompts and images of
several sizes, a concurrency range, its CSV.

    python scripts/perf_analyzer_load.py --url HOST:8001 --perf-analyzer PATH [--concurrency 1 4 8]
        [--mix] [--max-tokens 128] [--out-dir pa_out]

perf_analyzer cycles through the input entries: one 448 px image with a prompt, or with --mix
images of four sizes (224x320 to 1024x768, raw PNG/JPEG bytes sent as base64 text, which the
preprocess model accepts), a two-image request and a text-only one. gRPC streaming, one
perf_analyzer run per concurrency, its CSV kept. ``scripts/get_perf_analyzer.sh`` fetches a
perf_analyzer that runs without a GPU.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
from csv import DictReader
from pathlib import Path

from workload import PROMPT, encoded_image

MIX_SIZES = ((448, 448, "PNG"), (224, 320, "JPEG"), (640, 480, "PNG"), (1024, 768, "JPEG"))


def mixed_entries() -> list[tuple[str, list[bytes]]]:
    """(prompt, images) per request: four sizes, two images at once, text only."""
    images = [encoded_image(w, h, fmt, seed) for seed, (w, h, fmt) in enumerate(MIX_SIZES)]
    return [(PROMPT, [image]) for image in images] + [
        ("Compare these two pictures.", images[:2]),
        ("Write three sentences about the sea.", []),
    ]


def input_data(entries: list[tuple[str, list[bytes]]]) -> dict:
    """perf_analyzer's --input-data JSON: BYTES elements are JSON strings, so images go as base64."""
    data = []
    for prompt, images in entries:
        entry = {"prompt": {"content": [prompt], "shape": [1]}}
        entry["images"] = {"content": [base64.b64encode(i).decode() for i in images], "shape": [len(images)]}
        data.append(entry)
    return {"data": data}


def run_perf_analyzer(
    binary: str,
    url: str,
    entries: list[tuple[str, list[bytes]]],
    concurrency: int,
    workdir: Path,
    *,
    max_tokens: int = 128,
    measurement_ms: int = 8000,
    timeout_s: float = 240,
) -> dict:
    """One perf_analyzer run (gRPC streaming, EOS ignored): its summary lines and CSV, and from the
    CSV its requests/s and the output tokens/s they make (every request generates max_tokens)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "input.json"
    data.write_text(json.dumps(input_data(entries)))
    csv = workdir / f"pa_{concurrency}.csv"
    command = [
        binary, "-m", "qwen3_vl", "-u", url, "-i", "grpc", "--streaming", "--input-data", str(data),
        "--concurrency-range", str(concurrency), "--measurement-interval", str(measurement_ms),
        "--stability-percentage", "50", "--request-parameter", f"max_tokens:{max_tokens}:int",
        "--request-parameter", "ignore_eos:true:bool", "--request-parameter", "temperature:0:int", "-f", str(csv),
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    summary = [line.strip() for line in out.stdout.splitlines() if "Concurrency:" in line or "throughput" in line.lower()]
    result = {
        "returncode": out.returncode,
        "summary": summary[-4:],
        "csv": csv.read_text() if csv.exists() else (out.stdout + out.stderr)[-2000:],
    }
    if out.returncode == 0 and csv.exists():
        row = list(DictReader(io.StringIO(result["csv"])))[-1]  # one concurrency: one row
        result["requests_per_s"] = float(row["Inferences/Second"])
        result["output_tok_per_s"] = round(result["requests_per_s"] * max_tokens, 1)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="gRPC HOST:PORT of a running server")
    p.add_argument("--perf-analyzer", required=True, help="path of the perf_analyzer binary")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--mix", action="store_true", help="images of four sizes, two images, text only")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out-dir", type=Path, default=Path("pa_out"))
    args = p.parse_args()
    entries = mixed_entries() if args.mix else [(PROMPT, [encoded_image(448, 448)])]
    failed = 0
    for c in args.concurrency:
        result = run_perf_analyzer(args.perf_analyzer, args.url, entries, c, args.out_dir, max_tokens=args.max_tokens)
        failed += result["returncode"] != 0
        print("\n".join(result["summary"]) or result["csv"], flush=True)
    print(f"CSVs in {args.out_dir}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
