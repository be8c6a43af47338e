"""The decode tuner's picks kept on disk, per GPU and kernel code, for the next start.

Every decode-sized 8-bit product, and the text model's prefill sizes, is tuned at start. The decode
sizes alone (35 keys of up to 44 candidates each) had the int8 engine start in 15.2 s on the H200 against bf16's 1.6, which has nothing to tune (run 13,
bench_engine.py's startup_s; the tuning's share not timed apart). And two processes of the same
code could pick differently where candidates time within noise: in run 13 that moved the one-row
step between 1.349 and 1.549 ms (docs/benchmarks.md). With the picks kept, a restart skips the
timing and serves the same kernels: 2.97 s (run 14, picks from the same run's earlier processes;
on a fresh machine, with Triton's compile cache empty too, 105.6 s).
An entry is used only where everything it depends on is unchanged (``fingerprint``: this module's
kernels, Triton, PyTorch, the GPU and whether programmatic launch is on), and its launch is checked
against the float32 reference before it is served (``int8_matmul.launch_for``).

``QWEN3VL_TUNING_CACHE``: the file (default ``~/.cache/qwen3vl-triton/decode-tuning.json``); empty
or ``0`` turns the cache off. A file that cannot be read or written is skipped with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ENV = "QWEN3VL_TUNING_CACHE"
DEFAULT = Path.home() / ".cache" / "qwen3vl-triton" / "decode-tuning.json"


def cache_path() -> Path | None:
    value = os.environ.get(ENV)
    if value is None:
        return DEFAULT
    return None if value in ("", "0") else Path(value)


@functools.lru_cache(maxsize=None)
def fingerprint(device) -> str:
    """What an entry's pick depends on, hashed (once per device: the tuner asks for every key)."""
    import torch
    import triton

    from . import int8_matmul, pdl

    properties = torch.cuda.get_device_properties(device)
    parts = [Path(int8_matmul.__file__).read_bytes(), triton.__version__.encode(), torch.__version__.encode(),
             f"{properties.name}|{properties.multi_processor_count}|pdl={pdl.enabled(device)}".encode()]  # fmt: skip
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def key_name(key: tuple) -> str:
    """(rows bucket, N, K, weight dtype, x dtype) -> a JSON object key."""
    return "|".join(str(part).replace("torch.", "") for part in key)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as problem:
        print(f"qwen3vl: tuning cache {path} unreadable ({problem}); tuning anew", file=sys.stderr)
        return {}


def lookup(print_: str, key: tuple) -> dict | None:
    """The cached launch's fields for ``key`` under fingerprint ``print_``, or None."""
    path = cache_path()
    if path is None:
        return None
    return _read(path).get(print_, {}).get(key_name(key))


def store(print_: str, key: tuple, launch) -> None:
    """Add one pick (a ``Launch``) to the file, replaced whole (a reader never sees half a file);
    entries of other fingerprints (another GPU, older code) are dropped."""
    path = cache_path()
    if path is None:
        return
    entries = _read(path).get(print_, {})
    entries[key_name(key)] = asdict(launch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as out:
            json.dump({print_: entries}, out, indent=1)
        os.replace(out.name, path)
    except OSError as problem:
        print(f"qwen3vl: tuning cache {path} not written ({problem})", file=sys.stderr)
