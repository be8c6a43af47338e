"""The same load against one GPU and against several of one host: throughput scaling, memory per GPU.

    python scripts/bench_gpus.py --repository REPO --gpu-set 0 --gpu-set 0,1 [--concurrency 128]
        [--out bench_gpus.json]

REPO is a repository from build-repo, e.g. ``--quant int8 --vision-backend decoder --kv-cache-slots
64 --tiers scripts/tiers_capacity.json`` (KV slots are per engine, so two GPUs hold twice the
streams). For each --gpu-set a hard-linked copy gets those GPUs (configure-repo --gpus) and is
served alone, in turn; a closed loop of --concurrency streams (448 px image, 128 new tokens each)
runs against it. Prints a table (GPUs, output tok/s, scaling against the first set, TTFT, time per
output token, memory of each GPU) and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_triton import closed_loop  # noqa: E402
from workload import encoded_image  # noqa: E402

from builder.reconfigure import reconfigure_repository  # noqa: E402
from builder.serve import TritonServer  # noqa: E402


def memory_by_gpu() -> dict[int, float]:
    """GiB in use on each GPU (nvidia-smi); empty on a machine without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True
        )
    except FileNotFoundError:
        return {}
    rows = (line.split(",") for line in out.stdout.splitlines() if "," in line)
    return {int(index): round(float(mib) / 1024, 2) for index, mib in rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--gpu-set", action="append", required=True, metavar="IDS", help="comma-separated GPU ids (repeat)")
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--requests", type=int, help="requests per set (default: 3 x concurrency)")
    p.add_argument("--out", type=Path, default=Path("bench_gpus.json"))
    args = p.parse_args()
    image, rows = encoded_image(), []
    print("| GPUs | output tok/s | scaling | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | GiB per GPU |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.repository.parent) as tmp:
        for gpu_set in args.gpu_set:
            gpus = tuple(int(g) for g in gpu_set.split(","))
            layout = Path(tmp) / f"gpus-{'-'.join(map(str, gpus))}"
            reconfigure_repository(args.repository, {"gpus": gpus}, layout)
            with TritonServer(layout, ready_timeout_s=600) as server:
                closed_loop(server.grpc_url, image, 2, 4)  # warm-up
                row = closed_loop(server.grpc_url, image, args.concurrency, args.requests or 3 * args.concurrency)
                row.update(gpus=list(gpus), concurrency=args.concurrency, gpu_mem_gib=memory_by_gpu())
            row["scaling"] = row["output_tok_per_s"] / rows[0]["output_tok_per_s"] if rows else 1.0
            rows.append(row)
            memory = ", ".join(f"{gpu}: {gib}" for gpu, gib in row["gpu_mem_gib"].items()) or "n/a"
            print(
                f"| {gpu_set} | {row['output_tok_per_s']:.0f} | {row['scaling']:.2f}x | {row['ttft_p50_ms']:.1f} | "
                f"{row['ttft_p99_ms']:.1f} | {row['tpot_p50_ms']:.2f} | {memory} |",
                flush=True,
            )
    report = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "repository_manifest_options": json.loads((args.repository / "manifest.json").read_text())["options"],
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
