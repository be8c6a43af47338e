"""Small helpers shared by the Triton adapters (imported only inside a Triton Python model)."""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils


def model_parameters(args: dict) -> dict[str, str]:
    """The ``parameters`` block of the model's config.pbtxt, as strings."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def request_parameters(request) -> dict:
    """The request's parameters (sampling settings, tier), forwarded by the ensemble."""
    raw = request.parameters()
    return json.loads(raw) if raw else {}


def input_array(request, name: str, dtype, *, ndim: int, optional: bool = False):
    """An input as numpy, checked for dtype and rank; a clear ValueError names what is wrong."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if optional:
            return None
        raise ValueError(f"input '{name}' is missing")
    array = tensor.as_numpy()
    if array.dtype != np.dtype(dtype) or array.ndim != ndim:
        raise ValueError(f"input '{name}' must be {np.dtype(dtype).name} with {ndim} dims, got {array.dtype} {list(array.shape)}")
    return array


def one_request_input(request, name: str, dtype, *, ndim: int):
    """An input of a model with max_batch_size > 0, which Triton hands over as [1, *dims] per
    request (never concatenated for a Python model): that request's [*dims] array."""
    array = input_array(request, name, dtype, ndim=ndim + 1)
    if array.shape[0] != 1:
        raise ValueError(f"input '{name}' must hold one request (leading dimension 1), got {list(array.shape)}")
    return array[0]


def error_response(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
