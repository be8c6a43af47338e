"""Echo language model: streams the prompt back one word per response (decoupled)."""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(text: str, token_ids: list, finish_reason: str, prompt_tokens: int):
    return pb_utils.InferenceResponse([
        pb_utils.Tensor("text", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("token_ids", np.array(token_ids, dtype=np.int64)),
        pb_utils.Tensor("finish_reason", np.array([finish_reason.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int32)),
    ])


def _stream(request_json: str, sender) -> None:
    request = json.loads(request_json)
    params = request["parameters"]
    words = request["prompt"].split()
    if words[:1] == ["fail"]:
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("echo_lm: asked to fail")), flags=FINAL)
        return
    if request["image_sizes"]:
        words.insert(0, "[images: %s]" % ",".join(map(str, request["image_sizes"])))
    max_tokens = int(params.get("max_tokens", 1 << 30))
    stop = set(json.loads(params.get("stop", "[]")))
    if not words:
        sender.send(_response("", [], "stop", 0), flags=FINAL)
        return
    for i, word in enumerate(words):
        if word.startswith("sleep:"):
            time.sleep(float(word.split(":", 1)[1]))
        if word == "fail_mid" and i > 0:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("echo_lm: failed mid-stream")), flags=FINAL)
            return
        finish = "stop" if word in stop or i == len(words) - 1 else ("length" if i + 1 >= max_tokens else "")
        sender.send(_response(word + " ", [i], finish, len(words)), flags=FINAL if finish else 0)
        if finish:
            return


class TritonPythonModel:
    def execute(self, requests):
        # One thread per request so a sleeping stream does not hold up the others.
        for request in requests:
            payload = pb_utils.get_input_tensor_by_name(request, "request").as_numpy().reshape(-1)[0]
            threading.Thread(target=_stream, args=(payload.decode("utf-8"), request.get_response_sender()), daemon=True).start()
        return None
