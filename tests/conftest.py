"""Shared fixtures: a tiny random-weight Qwen3-VL checkpoint, repositories built from it by the
real build, and real tritonserver processes serving them."""

from __future__ import annotations

import io

import numpy as np
import pytest

from builder.checkpoint import make_demo_checkpoint

# Small enough for the CPU machine, large enough for every test prompt and answer. The tiny
# model's vision tower (initializer_range 0.5) is chaotic, so int8 vision weights would fail the
# build's parity check on it: they are tested on a well-conditioned tower (test_vision_quantize).
TEST_BUILD = dict(
    dtype="float32", device="cpu", vision_backend="python", vision_weights="float", max_context=1024, kv_cache_slots=4
)


class FakeClock:
    """A clock tests set by hand (clock.now = 3.5): timeouts and rate limits without sleeping."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def png(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return make_demo_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="session")
def build(tiny_checkpoint, tmp_path_factory):
    """build(quant, vision_backend) -> (repository path, manifest); each built once per session."""
    from builder.options import BuildOptions
    from builder.repository import build_repository

    built = {}

    def _build(quant: str = "none", vision_backend: str = TEST_BUILD["vision_backend"]):
        key = (quant, vision_backend)
        if key not in built:
            out = tmp_path_factory.mktemp(f"repo-{quant}-{vision_backend}")
            options = {**TEST_BUILD, "vision_backend": vision_backend}
            manifest = build_repository(BuildOptions(model=str(tiny_checkpoint), output=out, quant=quant, **options))
            built[key] = (out, manifest)
        return built[key]

    return _build


@pytest.fixture(scope="session")
def server(build):
    """A real tritonserver serving the unquantized float32 repository."""
    from builder.serve import TritonServer

    repository, _ = build("none")
    with TritonServer(repository) as running:
        yield running
