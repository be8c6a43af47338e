"""int8 vision weights: a 4x smaller encoder that stays close to the float tower."""

from __future__ import annotations

import pytest
import torch

from builder.checkpoint import demo_config
from builder.vision_export import VisionParityError, check_vision_parity, export_vision_onnx, onnx_encoder
from builder.vision_quantize import quantize_vision_weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def well_conditioned_tower():
    """The tiny tower with the real checkpoint's initializer_range (0.02), not the chaotic 0.5."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    config = demo_config().vision_config
    config.initializer_range = 0.02
    torch.manual_seed(0)
    return Qwen3VLVisionModel._from_config(config).eval()


def test_int8_weights_shrink_the_file_and_stay_within_tolerance(well_conditioned_tower, tiny_checkpoint, tmp_path):
    from transformers import AutoImageProcessor

    from builder.repository import VISION_INT8_RTOL

    exported = export_vision_onnx(well_conditioned_tower, tmp_path / "float" / "model.onnx", progress=lambda m: None)
    counts = quantize_vision_weights(exported, tmp_path / "int8" / "model.onnx")
    assert counts["quantized_matrices"] == 4 * 4 + 2 * 4  # 4 per block, 2 per merger (1 + 3 deepstack)
    assert counts["int8_bytes"] < 0.26 * counts["float_bytes"]
    # The tiny tower's float position table (a Gather, kept float) is a large share of its file.
    assert (tmp_path / "int8" / "model.onnx").stat().st_size < 0.6 * exported.stat().st_size
    processor = AutoImageProcessor.from_pretrained(tiny_checkpoint, backend="pil")
    int8 = onnx_encoder(tmp_path / "int8" / "model.onnx")
    report = check_vision_parity(
        well_conditioned_tower, int8, processor, rtol=VISION_INT8_RTOL, progress=lambda m: None
    )
    worst = max(out["max_rel"] for case in report.values() for out in case.values())
    assert 1e-4 < worst < VISION_INT8_RTOL  # really quantized, and close
    with pytest.raises(VisionParityError):  # the float tolerance would reject it
        check_vision_parity(well_conditioned_tower, int8, processor, progress=lambda m: None)
