"""``configure-repo``: change how a built repository serves without rebuilding its weights.

Tiers, KV-cache size, context length, image limits, instance counts and GPUs only reach the
config.pbtxt files; the build's slow part (ONNX export, quantization, parity and accuracy checks)
does not depend on them. So the configs are regenerated from the manifest's options with the
changes applied, in place or into a copy whose weight files are hard links (no extra disk).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from model_repository.qwen3vl_runtime import specs

from .cli import add_option_arguments
from .options import BuildOptions, OptionError
from .repository import MANIFEST, replace_file, write_configs

# The options that only the configs carry; the others decide the weights and need build-repo.
SERVING_OPTIONS = (
    "tiers",
    "max_context",
    "kv_cache_slots",
    "default_max_tokens",
    "max_pixels",
    "min_pixels",
    "max_images",
    "max_source_pixels",
    "preprocess_instances",
    "vision_instances",
    "gpus",
    "graphed_prefill",
    "prefill_hold_ms",
    "vision_graph_sizes",
)


def reconfigure_repository(repository: Path, changes: dict, output: Path | None = None, force: bool = False) -> dict:
    """Apply `changes` (SERVING_OPTIONS names to values) to `repository`, or to a linked copy at `output`."""
    repository = Path(repository)
    if not (repository / MANIFEST).is_file():
        raise ValueError(f"{repository} has no {MANIFEST}: not a repository written by build-repo")
    not_serving = sorted(set(changes) - set(SERVING_OPTIONS))
    if not_serving:
        raise ValueError(f"{', '.join(not_serving)} decide the weights: rebuild with build-repo")
    manifest = json.loads((repository / MANIFEST).read_text())
    target = Path(output) if output else repository
    with tempfile.TemporaryDirectory() as tmp:
        options = _options(manifest["options"], changes, target, Path(tmp))
        if target != repository:
            _linked_copy(repository, target, force)
        decoder_config = json.loads((target / specs.LANGUAGE_MODEL / "1" / "decoder" / "config.json").read_text())
        write_configs(target, options, decoder_config["text_config"]["hidden_size"])
        manifest["options"] = options.to_json()
    manifest["reconfigured"] = {
        "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "from": str(repository.resolve()),
        "changes": sorted(changes),
    }
    replace_file(target / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _options(recorded: dict, changes: dict, target: Path, tmp: Path) -> BuildOptions:
    """BuildOptions as the build recorded them, with the changes (validated as build-repo would)."""
    values = {f.name: recorded[f.name] for f in dataclasses.fields(BuildOptions) if f.name in recorded}
    tiers = tmp / "tiers.json"  # the manifest holds the tier table itself; options name a file
    tiers.write_text(json.dumps(values["tiers"]))
    values.update(tiers=tiers, gpus=tuple(values["gpus"]), output=target, force=False)
    values.update(changes)
    return BuildOptions(**values)


def _linked_copy(source: Path, output: Path, force: bool) -> None:
    if output.exists():
        if not force:
            raise ValueError(f"{output} exists; pass --force to replace it")
        shutil.rmtree(output)
    try:
        shutil.copytree(source, output, copy_function=os.link)
    except OSError:  # another filesystem: hard links cannot cross it
        shutil.rmtree(output, ignore_errors=True)
        shutil.copytree(source, output)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="configure-repo",
        description=__doc__.split("\n\n")[0] + " Options left out keep the repository's values.",
    )
    p.add_argument("repository", type=Path, help="a repository written by build-repo")
    p.add_argument("--output", type=Path, help="write a copy here (weights hard-linked) instead of changing REPOSITORY")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    add_option_arguments(p, SERVING_OPTIONS, keep=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    repository, output, force = args.pop("repository"), args.pop("output"), args.pop("force")
    changes = {name: value for name, value in args.items() if value is not None}
    try:
        reconfigure_repository(repository, changes, output, force)
    except (OptionError, ValueError, OSError) as exc:
        print(f"configure-repo: error: {exc}", file=sys.stderr)
        return 2
    where = output or repository
    print(f"Configured {where} ({', '.join(sorted(changes)) or 'no changes'}). Serve it with: serve-repo {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
