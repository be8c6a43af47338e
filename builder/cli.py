"""``build-repo``: command-line parsing only; the options and their defaults live in options.py."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from model_repository.qwen3vl_runtime.kv_cache import KV_CACHE_DTYPES

from .options import (
    DEVICES,
    DTYPES,
    QUANT_MODES,
    VISION_BACKENDS,
    VISION_WEIGHTS,
    BuildOptions,
    OptionError,
    option_fields,
)

CHOICES = {
    "quant": QUANT_MODES,
    "dtype": DTYPES,
    "kv_cache_dtype": KV_CACHE_DTYPES,
    "device": DEVICES,
    "vision_backend": VISION_BACKENDS,
    "vision_weights": VISION_WEIGHTS,
}


def _gpu_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"GPU ids must be comma-separated integers, got {text!r}") from None


def add_option_arguments(
    p: argparse.ArgumentParser, names: tuple[str, ...] | None = None, *, keep: bool = False
) -> None:
    """One flag per BuildOptions field (those in `names`, or all). With keep=True every default is
    None, meaning "unchanged" (configure-repo); otherwise the field's own default applies."""
    hints = typing.get_type_hints(BuildOptions)
    for f in option_fields():
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"help": f.metadata["help"], "dest": f.name}
        if keep:
            kwargs["default"] = None
        elif f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        kind = hints[f.name]
        if kind is bool:
            kwargs["action"] = "store_true"
        elif f.name == "gpus":
            kwargs["type"] = _gpu_ids
            if not keep:
                kwargs["default"] = ",".join(map(str, f.default))
        else:
            kwargs["type"] = Path if kind in (Path, Path | None) else kind
            if f.name in CHOICES:
                kwargs["choices"] = CHOICES[f.name]
        p.add_argument(flag, **kwargs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build-repo",
        description="Export and quantize Qwen3-VL into a Triton model repository (one streaming endpoint).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_option_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    if isinstance(args["gpus"], str):  # the default, not parsed by argparse
        args["gpus"] = _gpu_ids(args["gpus"])
    try:
        options = BuildOptions(**args)
        from .repository import build_repository

        manifest = build_repository(options)
    except (OptionError, ValueError) as exc:
        print(f"build-repo: error: {exc}", file=sys.stderr)
        return 2
    size = manifest["total_bytes"] / 2**20
    print(f"Wrote {options.output} ({size:,.1f} MiB). Serve it with: serve-repo {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
