"""Weight-only int8 for the exported vision encoder: int8 weights + DequantizeLinear in the graph.

Each MatMul/Gemm whose weight is a 2-D float initializer gets an int8 copy with one symmetric
scale per output channel, dequantized in the graph just before the product. The file shrinks
4x (the repository stays small, the tower loads faster); activations and arithmetic stay float,
so every execution provider runs it (ONNX Runtime's CUDA EP has no int8 GEMM: int8 arithmetic on
GPU would need TensorRT).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Initializers smaller than this stay float: biases, norms and tiny tables save nothing.
MIN_QUANTIZED_ELEMENTS = 4096


def _per_channel_int8(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """weight: 2-D float -> (int8 of the same shape, float32 scale per index of ``axis``)."""
    reduce_axis = 1 - axis
    scale = np.abs(weight).max(axis=reduce_axis).astype(np.float32) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    shaped = scale[None, :] if axis == 1 else scale[:, None]
    return np.clip(np.rint(weight / shaped), -127, 127).astype(np.int8), scale


def quantize_vision_weights(src: Path, dest: Path) -> dict:
    """Write ``dest`` (one self-contained file) from ``src`` with int8 weights; returns counts."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))  # external data is read from src's folder
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    # Output channel of the weight operand: MatMul's B is [in, out]; Gemm's B is [out, in] when transB.
    targets: dict[str, int] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        targets.setdefault(node.input[1], 0 if transposed else 1)

    quantized, float_bytes, int8_bytes = 0, 0, 0
    for name, axis in targets.items():
        init = initializers[name]
        weight = numpy_helper.to_array(init)
        if weight.ndim != 2 or weight.dtype.kind != "f" or weight.size < MIN_QUANTIZED_ELEMENTS:
            continue
        q, scale = _per_channel_int8(weight.astype(np.float32), axis)
        graph.initializer.remove(init)
        graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{name}_int8"),
                numpy_helper.from_array(scale.astype(weight.dtype), f"{name}_scale"),
                numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero"),
            ]
        )
        # Consumers keep reading `name`, now the output of the DequantizeLinear node.
        graph.node.insert(
            0,
            helper.make_node(
                "DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"], [name], axis=axis, name=f"{name}_dq"
            ),
        )
        quantized += 1
        float_bytes += weight.nbytes
        int8_bytes += q.nbytes + scale.nbytes
    onnx.checker.check_model(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dest))
    return {"quantized_matrices": quantized, "float_bytes": float_bytes, "int8_bytes": int8_bytes}
