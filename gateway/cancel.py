"""Cancel a request in the decoder by its id.

Triton 2.51 checks an ensemble request's cancellation only between steps, so a client that
leaves never reaches the running decoder step (docs/triton_findings.md). The gateway knows when
its client left: it sends the decoder one request that names the abandoned one
(`cancel_request_id`); the decoder's engine ends it and frees its KV slot. The placeholder tensors
only satisfy the model's input signature (read from its metadata); the model does not read them.
"""

from __future__ import annotations

import queue

import numpy as np

DECODER = "language_model"
NUMPY = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32}


def cancel_in_decoder(triton_url: str, request_id: str, timeout_s: float = 10.0) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_url)
    try:
        inputs = []
        for spec in client.get_model_metadata(DECODER, as_json=True)["inputs"]:
            shape = [1 if int(d) < 0 else int(d) for d in spec["shape"]]
            tensor = grpcclient.InferInput(spec["name"], shape, spec["datatype"])
            tensor.set_data_from_numpy(np.zeros(shape, dtype=NUMPY[spec["datatype"]]))
            inputs.append(tensor)
        done: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: done.put(error))
        client.async_stream_infer(
            DECODER, inputs, parameters={"cancel_request_id": request_id}, enable_empty_final_response=True
        )
        error = done.get(timeout=timeout_s)
        if error is not None:
            raise RuntimeError(f"cancelling {request_id} failed: {error}")
    finally:
        client.stop_stream()
        client.close()
