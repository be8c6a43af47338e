"""What the benchmark scripts share: the long image prompt, random-pixel images (encoded),
matplotlib when it is there, the JSON reports' header (machine, date, command), and the command
line and timing of the CPU benchmarks over a checkpoint's tokenizer and processor files."""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = (
    "Look at this picture carefully and describe every object you can see, their colours, positions "
    "and what they might be used for, in plain words, as a short list of numbered points."
)


def pyplot():
    """matplotlib's pyplot drawing to files, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def encoded_image(width: int = 448, height: int = 448, fmt: str = "PNG", seed: int = 0) -> bytes:
    """Random pixels (the worst case for PNG and JPEG sizes), encoded as a client would send them."""
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _report(machine: dict, results_key: str, results, **extra) -> str:
    header = {**machine, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
    return json.dumps({**header, **extra, results_key: results}, indent=2) + "\n"


def write_gpu_report(path: Path, results: list[dict]) -> None:
    """The JSON every GPU script writes: machine (the CUDA device), date, command, torch, results."""
    import torch

    path.write_text(_report({"machine": torch.cuda.get_device_name()}, "results", results, torch=torch.__version__))


def write_table(out: Path, columns: tuple[str, str], key: str, rows: dict[str, float], **extra) -> None:
    """Print rows as a two-column table; write them as JSON (``write_host_report``)."""
    print(f"| {columns[0]} | {columns[1]} |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value} |")
    write_host_report(out, key, rows, **extra)


def write_host_report(out: Path, key: str, results, **extra) -> None:
    """results as JSON under ``key`` with this machine (host and CPU), the date, the command and ``extra``."""
    machine = {"machine": platform.node(), "processor": platform.processor() or platform.machine()}
    out.write_text(_report(machine, key, results, **extra))


def median_ms(call, repeat: int) -> float:
    """Median wall milliseconds of ``call()`` over ``repeat`` calls, after one warm-up call."""
    call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def checkpoint_cli(doc: str, run, *, default_out: str, repeat: int) -> int:
    """The command line of the CPU benchmarks over a checkpoint's tokenizer and processor files:
    --checkpoint (default: the demo's, which the package ships), --repeat, --out; calls run(checkpoint, args)."""
    from builder.checkpoint import make_demo_checkpoint

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (tokenizer, processor); default: the demo's files")
    p.add_argument("--repeat", type=int, default=repeat)
    p.add_argument("--out", type=Path, default=Path(default_out))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        return run(args.checkpoint or make_demo_checkpoint(Path(tmp)), args)
