"""Vision tower: host-side position inputs, ONNX export and parity, and the Triton runner."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
)

from model_repository.qwen3vl_runtime.specs import NUMPY_DTYPES, VISION_INPUTS, VISION_OUTPUTS
from model_repository.qwen3vl_runtime.vision_inputs import check_vision_inputs, vision_position_inputs

REPOSITORY_SOURCE = Path(__file__).parents[1] / "model_repository"
GRIDS = {
    "square": [[1, 28, 28]],
    "wide": [[1, 14, 40]],
    "smallest": [[1, 2, 2]],
    "larger than the table": [[1, 96, 60]],
    "two frames": [[2, 4, 6]],
    "multi-image": [[1, 14, 20], [1, 40, 16], [2, 6, 4]],
}


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_position_inputs_equal_transformers(grid):
    grid_thw = torch.tensor(grid)
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid_thw, 48, mode="bilinear", align_corners=True, spatial_merge_size=2
    )
    ours = vision_position_inputs(np.array(grid), num_grid_per_side=48, spatial_merge_size=2)
    assert list(ours) == [spec.name for spec in VISION_INPUTS[1:]]
    for spec in VISION_INPUTS[1:]:
        assert ours[spec.name].dtype == NUMPY_DTYPES[spec.dtype], spec.name
    np.testing.assert_array_equal(ours["pos_interp_indices"], indices.numpy())
    np.testing.assert_allclose(ours["pos_interp_weights"], weights.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ours["rotary_pos_ids"], get_vision_position_ids(grid_thw, 2).numpy())
    np.testing.assert_array_equal(ours["cu_seqlens"], get_vision_cu_seqlens(grid_thw).numpy())


@pytest.mark.parametrize("grid", [[[1, 3, 4]], [[1, 0, 4]], np.zeros((0, 3))])
def test_position_inputs_reject_bad_grids(grid):
    with pytest.raises(ValueError, match="grid_thw"):
        vision_position_inputs(np.array(grid), num_grid_per_side=48, spatial_merge_size=2)


def test_check_vision_inputs_catches_inconsistent_inputs():
    inputs = {"pixel_values": np.zeros((20, 1536), np.float32)}
    grid = np.array([[1, 2, 2], [1, 4, 4]])
    inputs.update(vision_position_inputs(grid, num_grid_per_side=48, spatial_merge_size=2))
    check_vision_inputs(inputs)
    with pytest.raises(ValueError, match="cu_seqlens"):
        check_vision_inputs({**inputs, "cu_seqlens": np.array([0, 4, 16], np.int32)})
    with pytest.raises(ValueError, match="patch count"):
        check_vision_inputs({**inputs, "rotary_pos_ids": inputs["rotary_pos_ids"][:-1]})


@pytest.fixture(scope="module")
def tiny_vision(tiny_checkpoint):
    from transformers import AutoImageProcessor, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    return model.model.visual, AutoImageProcessor.from_pretrained(tiny_checkpoint, backend="pil")


@pytest.fixture(scope="module")
def exported(tiny_vision, tmp_path_factory):
    from builder.vision_export import export_vision_onnx

    out = tmp_path_factory.mktemp("vision") / "model.onnx"
    return export_vision_onnx(tiny_vision[0], out, progress=lambda _: None)


@pytest.mark.slow
def test_onnx_signature_is_the_spec_table(exported):
    import onnx

    graph = onnx.load(str(exported)).graph
    dtypes = {"FP32": onnx.TensorProto.FLOAT, "INT64": onnx.TensorProto.INT64, "INT32": onnx.TensorProto.INT32}
    values = list(graph.input) + list(graph.output)
    specs = VISION_INPUTS + VISION_OUTPUTS
    assert [(v.name, v.type.tensor_type.elem_type) for v in values] == [(s.name, dtypes[s.dtype]) for s in specs]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}
    assert dims == {
        "pixel_values": ["patches", 1536],
        "pos_interp_indices": ["patches", 4],
        "pos_interp_weights": ["patches", 4],
        "rotary_pos_ids": ["patches", 2],
        "cu_seqlens": ["images_plus_1"],
        "image_embeds": ["merged_patches", 128],
        "deepstack_embeds": [3, "merged_patches", 128],
    }


@pytest.mark.slow
def test_export_parity_single_and_multi_image(tiny_vision, exported):
    from builder.vision_export import check_vision_parity, onnx_encoder

    visual, image_processor = tiny_vision
    report = check_vision_parity(visual, onnx_encoder(exported), image_processor, progress=lambda _: None)
    assert list(report) == ["448x448", "224x320", "640x256", "448x448+224x320"]
    assert all(set(errors) == {"image_embeds", "deepstack_embeds"} for errors in report.values())


@pytest.mark.slow
def test_onnx_runs_an_unseen_grid(tiny_vision, exported):
    import onnxruntime as ort

    from builder.vision_export import sample_inputs

    visual, _ = tiny_vision
    grid = [[1, 2, 34], [1, 6, 6]]  # a 1x17 strip of merged tokens, then a square
    inputs = sample_inputs(visual, grid, seed=1)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    image_embeds, deepstack = session.run(None, {name: value.numpy() for name, value in inputs.items()})
    with torch.no_grad():
        reference = visual(inputs["pixel_values"], grid_thw=torch.tensor(grid))
    assert image_embeds.shape == (26, 128) and deepstack.shape == (3, 26, 128)  # (2*34 + 6*6) / 4 tokens
    scale = reference.pooler_output.abs().max().item()
    np.testing.assert_allclose(image_embeds, reference.pooler_output.numpy(), rtol=0, atol=1e-3 * scale)
    np.testing.assert_allclose(deepstack[2], reference.deepstack_features[2].numpy(), rtol=0, atol=1e-3 * scale)


@pytest.mark.slow
def test_parity_catches_attention_across_images(tiny_vision, tmp_path, monkeypatch):
    """An export whose attention crosses image boundaries passes alone, fails on two images."""
    from builder import vision_export

    whole = vision_export._BlockDiagonalAttention.__init__
    monkeypatch.setattr(vision_export._BlockDiagonalAttention, "__init__", lambda self, cu: whole(self, cu[[0, -1]]))
    visual, image_processor = tiny_vision
    broken = vision_export.export_vision_onnx(visual, tmp_path / "model.onnx", progress=lambda _: None)
    with pytest.raises(vision_export.VisionParityError, match=r"448x448\+224x320 image_embeds"):
        vision_export.check_vision_parity(visual, vision_export.onnx_encoder(broken), image_processor, progress=lambda _: None)


@pytest.fixture
def fresh_runtime_imports(monkeypatch):
    """model.py imports ``qwen3vl_runtime`` top-level from its own directory; undo that afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))

    def pop_runtime() -> dict:
        return {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] == "qwen3vl_runtime"}

    saved = pop_runtime()
    yield
    pop_runtime()
    sys.modules.update(saved)


@pytest.mark.slow
def test_triton_model_runs_the_onnx(exported, tiny_vision, tmp_path, monkeypatch, fresh_runtime_imports):
    """model.py against a stand-in for Triton's pb_utils: outputs, and an error for a bad request."""
    version = tmp_path / "vision_encoder" / "1"
    shutil.copytree(REPOSITORY_SOURCE / "qwen3vl_runtime", version / "qwen3vl_runtime")
    shutil.copy(REPOSITORY_SOURCE / "vision_encoder" / "1" / "model.py", version)
    shutil.copy(exported, version / "model.onnx")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("vision_encoder_model", version / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    model = module.TritonPythonModel()
    model.initialize({"model_instance_kind": "CPU", "model_instance_device_id": "0"})
    from builder.vision_export import sample_inputs

    good = {name: value.numpy() for name, value in sample_inputs(tiny_vision[0], [[1, 4, 6]]).items()}
    bad = {name: value for name, value in good.items() if name != "cu_seqlens"}
    ok, error = model.execute([good, bad])
    assert ok.error is None and ok.output_tensors["image_embeds"].shape == (6, 128)
    assert ok.output_tensors["deepstack_embeds"].shape == (3, 6, 128)
    assert "missing input 'cu_seqlens'" in error.error.message
    model.finalize()


def _fake_pb_utils() -> types.ModuleType:
    """The few names of Triton's ``triton_python_backend_utils`` model.py uses; a request is a dict."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.output_tensors, self.error = {t.name: t.array for t in output_tensors}, error

    pb.Tensor, pb.InferenceResponse = Tensor, InferenceResponse
    pb.TritonError = type("TritonError", (), {"__init__": lambda self, message: setattr(self, "message", message)})
    pb.Logger = types.SimpleNamespace(log_info=lambda message: None)
    pb.get_input_tensor_by_name = lambda request, name: Tensor(name, request[name]) if name in request else None
    return pb
