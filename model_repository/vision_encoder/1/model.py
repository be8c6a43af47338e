"""Triton Python-backend model: the Qwen3-VL vision encoder, ``model.onnx`` run by ONNX Runtime.

One ONNX Runtime session per model instance, on the instance's GPU through the CUDA execution
provider when Triton placed it on one and onnxruntime-gpu is installed, else on the CPU.
"""

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# The build copies the qwen3vl_runtime package next to this file.
sys.path.insert(0, str(Path(__file__).parent))
from qwen3vl_runtime.specs import NUMPY_DTYPES, VISION_INPUTS, VISION_OUTPUTS  # noqa: E402
from qwen3vl_runtime.vision_inputs import check_vision_inputs  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        model_path = Path(__file__).parent / "model.onnx"
        if not model_path.is_file():
            raise FileNotFoundError(f"vision_encoder: no ONNX model at {model_path}")
        providers = ["CPUExecutionProvider"]
        if args["model_instance_kind"] == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels, before the session
                ort.preload_dlls()
            device_id = int(args["model_instance_device_id"])
            # The arena grows by what is asked, not to the next power of two: GPU memory stays
            # near what the encoder needs, on a card shared by every tier.
            options = {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested"}
            providers.insert(0, ("CUDAExecutionProvider", options))
        # ONNX Runtime looks for model.onnx.data (the full-size weights) next to model.onnx.
        self.session = ort.InferenceSession(str(model_path), providers=providers)
        pb_utils.Logger.log_info(f"vision_encoder: {model_path} on {self.session.get_providers()[0]}")

    def execute(self, requests):
        return [self._run(request) for request in requests]

    def _run(self, request):
        """One response per request; a bad request gets an error response, never an exception."""
        try:
            inputs = {}
            for spec in VISION_INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
                if tensor is None:
                    raise ValueError(f"missing input {spec.name!r}")
                inputs[spec.name] = np.ascontiguousarray(tensor.as_numpy(), dtype=NUMPY_DTYPES[spec.dtype])
            check_vision_inputs(inputs)
            outputs = self.session.run([spec.name for spec in VISION_OUTPUTS], inputs)
        except Exception as exc:  # ValueError from the checks, ONNX Runtime's own error types
            return pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(f"vision_encoder: {type(exc).__name__}: {exc}")
            )
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(spec.name, out) for spec, out in zip(VISION_OUTPUTS, outputs)]
        )

    def finalize(self):
        self.session = None
