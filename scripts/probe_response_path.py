"""What one response-sender call costs inside a Triton Python model: `is_cancelled()` and `send()`.

    python scripts/probe_response_path.py [--calls 2000]

Writes a one-model repository (a decoupled Python model that times N calls of each on one
request's response sender), serves it with serve.py's TritonServer, and prints microseconds per
call. This is why the decoder asks is_cancelled() on an interval, not every step.
"""

from __future__ import annotations

import argparse
import queue
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.serve import TritonServer  # noqa: E402

CONFIG = """name: "probe"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "calls" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "us_per_call" data_type: TYPE_FP64 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
MODEL = '''import time
import numpy as np
import triton_python_backend_utils as pb_utils


def reply(value):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("us_per_call", np.array([value]))])


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            calls = int(pb_utils.get_input_tensor_by_name(request, "calls").as_numpy()[0])
            start = time.perf_counter()
            for _ in range(calls):
                sender.is_cancelled()
            cancelled_us = (time.perf_counter() - start) / calls * 1e6
            start = time.perf_counter()
            for _ in range(calls):
                sender.send(reply(cancelled_us))
            send_us = (time.perf_counter() - start) / calls * 1e6
            sender.send(reply(send_us), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    import tritonclient.grpc as grpcclient

    with tempfile.TemporaryDirectory() as repo:
        (Path(repo) / "probe" / "1").mkdir(parents=True)
        (Path(repo) / "probe" / "config.pbtxt").write_text(CONFIG)
        (Path(repo) / "probe" / "1" / "model.py").write_text(MODEL)
        with TritonServer(repo) as server:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            answers: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            calls = grpcclient.InferInput("calls", [1], "INT32")
            calls.set_data_from_numpy(np.array([args.calls], dtype=np.int32))
            client.async_stream_infer("probe", [calls])
            values = []
            for _ in range(args.calls + 1):
                result, error = answers.get(timeout=120)
                if error is not None:
                    raise RuntimeError(error.message())
                values.append(float(result.as_numpy("us_per_call")[0]))
            client.stop_stream()
    print(f"is_cancelled(): {values[0]:.1f} us per call; send() with one small tensor: {values[-1]:.1f} us per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
