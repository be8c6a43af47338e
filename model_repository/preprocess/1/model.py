"""Triton adapter of the preprocessing step (CPU): prompt + image bytes -> ids, positions, patches."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from qwen3vl_runtime.images import ImageError  # noqa: E402
from qwen3vl_runtime.preprocessing import PreprocessLimits, Preprocessor  # noqa: E402
from qwen3vl_runtime.triton_io import error_response, input_array, model_parameters  # noqa: E402
from qwen3vl_runtime.vision_inputs import PIXEL_BYTES  # noqa: E402

PROCESSOR_DIR = Path(__file__).parent / "processor"


class TritonPythonModel:
    def initialize(self, args):
        settings = model_parameters(args)
        limits = PreprocessLimits(**{name: int(settings[name]) for name in PreprocessLimits.__dataclass_fields__})
        # The config's outputs say which form the images take: bytes when the decoder runs the tower.
        outputs = {output["name"] for output in json.loads(args["model_config"])["output"]}
        self.preprocessor = Preprocessor(PROCESSOR_DIR, limits, pixel_bytes=PIXEL_BYTES in outputs)
        self.preprocessor.warm_up()
        # String inputs break under numpy 2 with some Python backend stubs: say which one runs.
        pb_utils.Logger.log_info(f"preprocess: numpy {np.__version__} from {np.__file__}")

    def execute(self, requests):
        return [self._run(request) for request in requests]

    def _run(self, request):
        try:
            prompt = input_array(request, "prompt", np.object_, ndim=1)
            images = input_array(request, "images", np.object_, ndim=1, optional=True)
            if prompt.size != 1:
                raise ValueError(f"prompt must hold exactly one string, got {prompt.size}")
            text = _utf8(prompt[0], "prompt")
            outputs = self.preprocessor(text, [bytes(b) for b in (images if images is not None else [])])
        except (ValueError, ImageError) as exc:
            return error_response(str(exc))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])


def _utf8(value, name: str) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise ValueError(f"{name} is not valid UTF-8") from None
