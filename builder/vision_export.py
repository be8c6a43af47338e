"""Export the Qwen3-VL vision tower to ONNX, and check a served encoder (the ONNX graph, or the
tower as the decoder runs it) against the original PyTorch module.

The exported graph takes the host-side position inputs of ``qwen3vl_runtime.vision_inputs`` and
keeps only static control flow: the patch embedding is a MatMul, and the per-image attention
(a Python split over ``cu_seqlens.tolist()`` in transformers) is one SDPA call under a
block-diagonal mask built in the graph, so the patch and image counts stay dynamic.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_repository.qwen3vl_runtime.specs import VISION_INPUTS, VISION_OUTPUTS
from model_repository.qwen3vl_runtime.vision_inputs import PIXEL_BYTES, PIXEL_VALUES, vision_position_inputs
from model_repository.qwen3vl_runtime.vision_tower import encode_images

INPUT_NAMES = [spec.name for spec in VISION_INPUTS]
OUTPUT_NAMES = [spec.name for spec in VISION_OUTPUTS]
# Only the patch and image counts vary; the patch width (3*2*16*16) and tap counts are fixed.
# (An unknown name here would only warn and leave the axis static; the tests check the graph.)
DYNAMIC_AXES = {
    "pixel_values": {0: "patches"},
    "pos_interp_indices": {0: "patches"},
    "pos_interp_weights": {0: "patches"},
    "rotary_pos_ids": {0: "patches"},
    "cu_seqlens": {0: "images_plus_1"},
    "image_embeds": {0: "merged_patches"},
    "deepstack_embeds": {1: "merged_patches"},
}
# Over this size the graph's weights go to one external file (protobuf caps a file at 2 GiB).
EXTERNAL_DATA_BYTES = 1_500_000_000
# The grid of the sample inputs traced at export: two images, so the mask has two blocks.
EXPORT_GRID = ((1, 8, 12), (1, 4, 8))


class VisionParityError(ValueError):
    """The ONNX vision encoder disagrees with the PyTorch vision tower beyond tolerance."""


class VisionEncoderForExport(nn.Module):
    """The HF ``Qwen3VLVisionModel`` forward on host-side position inputs, traceable to ONNX:
    ``encode_images`` (shared with the decoder's in-process tower) under a block-diagonal mask."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values, pos_interp_indices, pos_interp_weights, rotary_pos_ids, cu_seqlens):
        attend = _BlockDiagonalAttention(cu_seqlens)
        return encode_images(self.visual, pixel_values, pos_interp_indices, pos_interp_weights, rotary_pos_ids, attend)


class _BlockDiagonalAttention:
    """One SDPA over all patches, masked to pairs in the same image (same attention segment).

    The mask is built on the first call and reused by every layer (one subgraph in the export).
    """

    def __init__(self, cu_seqlens: torch.Tensor):
        self.cu_seqlens = cu_seqlens
        self.mask = None

    def __call__(self, q, k, v, scale: float) -> torch.Tensor:  # [N, H, hd] each
        if self.mask is None:
            # arange over q's first dimension keeps the patch count symbolic in the traced graph.
            patch = torch.arange(q.shape[0], device=q.device)  # [N]
            segment = (patch[:, None] >= self.cu_seqlens[None, 1:].long()).sum(-1)  # [N] image index
            self.mask = segment[:, None] == segment[None, :]  # [N, N]
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, N, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale)  # [1, H, N, hd]
        return out[0].transpose(0, 1)


def sample_inputs(visual: nn.Module, grid_thw, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pixel values plus the host-side position inputs for patch grids ``grid_thw``."""
    config = visual.config
    positions = _position_inputs(visual, np.asarray(grid_thw))
    patches = int(np.asarray(grid_thw).prod(axis=1).sum())
    width = config.in_channels * config.temporal_patch_size * config.patch_size**2
    generator = torch.Generator().manual_seed(seed)
    inputs = {PIXEL_VALUES: torch.randn(patches, width, generator=generator)}
    inputs.update({name: torch.from_numpy(value) for name, value in positions.items()})
    return {name: inputs[name] for name in INPUT_NAMES}


def _position_inputs(visual: nn.Module, grid_thw: np.ndarray) -> dict[str, np.ndarray]:
    return vision_position_inputs(
        grid_thw, num_grid_per_side=visual.num_grid_per_side, spatial_merge_size=visual.spatial_merge_size
    )


def export_vision_onnx(
    visual: nn.Module, out_path: Path, *, opset: int = 18, progress: Callable[[str], None] = print
) -> Path:
    """Export ``visual`` (an HF ``Qwen3VLVisionModel``, float32) to ``out_path`` (``model.onnx``).

    Weights over ~1.5 GB go to one ``<name>.data`` file next to it. Returns ``out_path``.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = VisionEncoderForExport(visual).eval()
    args = tuple(sample_inputs(visual, EXPORT_GRID).values())
    n_bytes = sum(p.numel() * p.element_size() for p in visual.parameters())
    progress(f"vision export: tracing {n_bytes / 1e6:.0f} MB of weights (opset {opset})")
    start = time.perf_counter()
    # Export into a scratch directory first: the TorchScript exporter writes one file per tensor
    # above 2 GiB, and the weights are then saved again as a single external-data file.
    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
        traced = Path(scratch) / "traced.onnx"
        with torch.no_grad():
            torch.onnx.export(
                wrapper, args, str(traced), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                dynamic_axes=DYNAMIC_AXES, opset_version=opset, dynamo=False,
            )  # fmt: skip
        progress(f"vision export: traced in {time.perf_counter() - start:.1f}s; saving")
        _save(traced, out_path, external=n_bytes > EXTERNAL_DATA_BYTES)
    size = sum(p.stat().st_size for p in out_path.parent.glob(out_path.name + "*"))
    progress(f"vision export: wrote {out_path} ({size / 1e6:.0f} MB) in {time.perf_counter() - start:.1f}s")
    return out_path


def _save(traced: Path, out_path: Path, *, external: bool) -> None:
    """Save the traced graph as ``out_path`` (+ one ``.data`` file if external) and check it."""
    import onnx

    model = onnx.load(str(traced))
    data = out_path.with_name(out_path.name + ".data")
    data.unlink(missing_ok=True)  # save_model appends to an existing data file
    onnx.save_model(
        model, str(out_path), save_as_external_data=external, all_tensors_to_one_file=True, location=data.name
    )
    if external:
        # onnx creates the data file owner-only (0600); a server running as another user (as in
        # NVIDIA's container) must read it like model.onnx.
        data.chmod(out_path.stat().st_mode & 0o777)
    onnx.checker.check_model(str(out_path))


Encode = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def onnx_encoder(onnx_path: Path) -> Encode:
    """The exported encoder on ONNX Runtime's CPU provider: feeds -> outputs by name."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return lambda feeds: dict(zip(OUTPUT_NAMES, session.run(OUTPUT_NAMES, {name: feeds[name] for name in INPUT_NAMES})))


def in_process_encoder(visual: nn.Module, pixel_table: np.ndarray) -> Encode:
    """The tower as the decoder runs it (``--vision-backend decoder``, on the images' bytes and
    the processor's ``pixel_table``): feeds -> outputs by name."""
    from model_repository.qwen3vl_runtime.engine.vision import ImageEncoder, ImageInputs

    encoder = ImageEncoder(visual, pixel_table)

    def encode(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = encoder([ImageInputs.from_arrays(feeds)])
        return {name: out.float().cpu().numpy() for name, out in zip(OUTPUT_NAMES, outputs)}

    return encode


def check_vision_parity(
    visual: nn.Module,
    encode: Encode,
    image_processor,
    *,
    sizes=((448, 448), (224, 320), (640, 256)),
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    progress: Callable[[str], None] = print,
) -> dict:
    """Compare a served encoder (``onnx_encoder``, ``in_process_encoder``) with the unpatched
    ``visual`` on random images.

    One call per (width, height) in ``sizes``, plus one call with the first two images together.
    Images go through the real ``image_processor`` and ``vision_position_inputs``, as they will when
    served. Returns ``{case: {output: {"max_abs": .., "max_rel": ..}}}`` where ``max_rel`` is
    ``max|served - torch| / max|torch|``. Raises VisionParityError if any output of any case has
    ``max_abs > atol + rtol * max|torch|``: random weights make the tower badly conditioned, so
    the bound scales with the output's magnitude.
    """
    from model_repository.qwen3vl_runtime.patches import PatchMaker

    rng = np.random.default_rng(seed)
    images = {size: _random_image(rng, size) for size in sizes}
    limits = image_processor.size  # the bytes for the decoder's tower, made once for every case
    patches = PatchMaker(image_processor, min_pixels=limits["shortest_edge"], max_pixels=limits["longest_edge"])
    cases = [[size] for size in sizes] + ([list(sizes[:2])] if len(sizes) > 1 else [])
    report, failures = {}, []
    for case in cases:
        name = "+".join(f"{w}x{h}" for w, h in case)
        start = time.perf_counter()
        got, want = _run_both(visual, encode, image_processor, patches, [images[size] for size in case])
        report[name] = {}
        for output in OUTPUT_NAMES:
            a, b = got[output], want[output]
            if a.shape != b.shape:
                raise VisionParityError(f"{name} {output}: served shape {a.shape}, PyTorch shape {b.shape}")
            err, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
            report[name][output] = {"max_abs": err, "max_rel": err / max(scale, 1e-30)}
            if err > atol + rtol * scale:
                failures.append(f"{name} {output}: max abs error {err:.3g} > {atol + rtol * scale:.3g}")
        errors = ", ".join(f"{o} {e['max_abs']:.2g} (rel {e['max_rel']:.2g})" for o, e in report[name].items())
        progress(f"vision parity {name}: {errors} [{time.perf_counter() - start:.1f}s]")
    if failures:
        raise VisionParityError(
            f"served vision encoder differs from PyTorch (atol={atol}, rtol={rtol}): " + "; ".join(failures)
        )
    return report


def _random_image(rng: np.random.Generator, size: tuple[int, int]):
    from PIL import Image

    width, height = size
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _run_both(visual, encode: Encode, image_processor, patches, images) -> tuple[dict, dict]:
    """Outputs of the served encoder and of the original ``visual`` for one processor batch. The
    served encoder's feeds hold the processor's pixels and, for the decoder's tower, the same
    images' bytes as the preprocess model makes them."""
    batch = image_processor(images=images, return_tensors="pt")
    pixel_values, grid_thw = batch["pixel_values"], batch["image_grid_thw"]  # [N, 1536], [images, 3]
    patch_bytes, _ = patches.make(images)
    feeds = {PIXEL_VALUES: pixel_values.numpy(), PIXEL_BYTES: patch_bytes, **_position_inputs(visual, grid_thw.numpy())}
    got = encode(feeds)
    with torch.no_grad():
        reference = visual(pixel_values, grid_thw=grid_thw)
    deepstack = torch.stack(list(reference.deepstack_features))  # [3, N / 4, out_hidden]
    want = dict(zip(OUTPUT_NAMES, (reference.pooler_output.numpy(), deepstack.numpy())))
    return got, want
