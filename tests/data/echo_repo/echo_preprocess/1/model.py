"""Echo preprocess: image sizes and request parameters in, one JSON string out."""

import base64
import binascii
import json

import numpy as np
import triton_python_backend_utils as pb_utils

_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"RIFF")


def _decode_image(item: bytes) -> bytes:
    # HTTP/JSON clients can only send text, so base64 is accepted beside raw encoded images.
    if not item.startswith(_IMAGE_MAGIC):
        try:
            item = base64.b64decode(item, validate=True)
        except binascii.Error:
            pass
    if not item.startswith(_IMAGE_MAGIC):
        raise ValueError("an image is neither PNG/JPEG/WebP bytes nor base64 of them")
    return item


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            prompt = pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy().reshape(-1)[0]
            images = pb_utils.get_input_tensor_by_name(request, "images")  # None when omitted
            items = [] if images is None else images.as_numpy().reshape(-1)
            try:
                sizes = [len(_decode_image(bytes(item))) for item in items]
            except ValueError as err:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err))))
                continue
            payload = {"prompt": prompt.decode("utf-8"), "image_sizes": sizes, "parameters": json.loads(request.parameters())}
            out = np.array([json.dumps(payload).encode("utf-8")], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("request", out)]))
        return responses
