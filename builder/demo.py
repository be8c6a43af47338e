"""``qwen3vl-demo``: the whole path on an embedded tiny model, from nothing to a streamed answer.

Makes a tiny random-weight Qwen3-VL with the real tokenizer and processor files this package
ships, builds its repository (CPU, float32), serves it with a real tritonserver, and asks one
question about a generated image over gRPC streaming. The answer is random-weight gibberish:
the point is that every part runs.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path


def demo_image() -> bytes:
    """A 448x448 PNG with a few shapes (no image files needed)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (448, 448), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 40, 200, 200), fill="red")
    draw.ellipse((230, 220, 420, 410), fill="blue")
    draw.text((60, 300), "Qwen3-VL", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwen3vl-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, help="keep the checkpoint and repository here (default: a temp dir)")
    p.add_argument("--prompt", default="What shapes are in this image?")
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args(argv)

    from .checkpoint import make_demo_checkpoint
    from .client import stream_generate
    from .options import BuildOptions
    from .repository import build_repository
    from .serve import TritonServer

    with tempfile.TemporaryDirectory(prefix="qwen3vl-demo-") as scratch:
        workdir = args.workdir or Path(scratch)
        print(f"Making a tiny random-weight Qwen3-VL in {workdir / 'checkpoint'}", file=sys.stderr)
        checkpoint = make_demo_checkpoint(workdir / "checkpoint")
        repository = workdir / "model_repository"
        build_repository(
            BuildOptions(
                model=str(checkpoint),
                output=repository,
                dtype="float32",
                device="cpu",
                vision_backend="python",  # the pip-installed server has no onnxruntime backend
                max_context=1024,
                kv_cache_slots=4,
                default_max_tokens=64,
                force=True,
            )
        )
        print("Starting tritonserver ...", file=sys.stderr)
        with TritonServer(repository) as server:
            print(f"Serving on gRPC {server.grpc_url}, HTTP {server.http_url}", file=sys.stderr)
            print(f"> {args.prompt}")
            for response in stream_generate(
                server.grpc_url,
                args.prompt,
                [demo_image()],
                parameters={"max_tokens": args.max_tokens, "temperature": 0},
            ):
                print(response["text"], end="", flush=True)
            print(f"\n[finish_reason={response['finish_reason']}, prompt_tokens={response['prompt_tokens']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
