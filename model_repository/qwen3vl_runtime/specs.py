"""The one table of tensors that every model, config, the ensemble and the client are built from.

A dimension of -1 is variable; ``"text_hidden"`` is filled in from the checkpoint's config when a
repository is built. Names are Triton tensor names and, for the vision encoder, ONNX names.
"""

from __future__ import annotations

from dataclasses import dataclass

# Model names inside a built repository.
ENSEMBLE = "qwen3_vl"
PREPROCESS = "preprocess"
VISION = "vision_encoder"
LANGUAGE_MODEL = "language_model"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton data type without the TYPE_ prefix: BYTES, FP32, INT64, ...
    dims: tuple  # ints, or "text_hidden" for the decoder's hidden size
    optional: bool = False
    doc: str = ""

    def resolved_dims(self, text_hidden: int) -> tuple[int, ...]:
        return tuple(text_hidden if d == "text_hidden" else d for d in self.dims)


# numpy dtypes by Triton data type, for the Python models and clients.
NUMPY_DTYPES = {"BYTES": "object", "UINT8": "uint8", "FP32": "float32", "FP16": "float16", "INT64": "int64", "INT32": "int32"}

# --- The endpoint: what a client sends and receives -------------------------------------------
ENDPOINT_INPUTS = (
    TensorSpec("prompt", "BYTES", (1,), doc="UTF-8 text of the user turn, or a JSON chat (see README)"),
    TensorSpec("images", "BYTES", (-1,), optional=True, doc="encoded images (PNG, JPEG or WebP, raw or base64)"),
)
ENDPOINT_OUTPUTS = (
    TensorSpec("text", "BYTES", (1,), doc="UTF-8 text generated since the previous response"),
    TensorSpec("token_ids", "INT64", (-1,), doc="token ids generated since the previous response"),
    TensorSpec("finish_reason", "BYTES", (1,), doc='"" while streaming; "stop" or "length" at the end'),
    TensorSpec("prompt_tokens", "INT32", (1,), doc="number of prompt tokens, image tokens included"),
)

# --- preprocess -> vision_encoder (or -> language_model, when the decoder runs the tower) ----------
PIXEL_VALUES = TensorSpec("pixel_values", "FP32", (-1, -1), doc="[patches, 3*2*16*16] in the processor's order")
PIXEL_BYTES = TensorSpec("pixel_bytes", "UINT8", (-1, -1), doc="[patches, 3*16*16]: the resized image's bytes in that order, one frame")
PATCH_POSITIONS = (
    TensorSpec("pos_interp_indices", "INT64", (-1, 4), doc="position-table taps per patch"),
    TensorSpec("pos_interp_weights", "FP32", (-1, 4), doc="bilinear weights of those taps"),
    TensorSpec("rotary_pos_ids", "INT64", (-1, 2), doc="(row, col) of each patch for 2-D RoPE"),
    TensorSpec("cu_seqlens", "INT32", (-1,), doc="[images + 1] cumulative patch counts"),
)
VISION_INPUTS = (PIXEL_VALUES, *PATCH_POSITIONS)
# The decoder applies the processor's per-channel table itself, on the GPU (patches.py).
DECODER_VISION_INPUTS = (PIXEL_BYTES, *PATCH_POSITIONS)
VISION_OUTPUTS = (
    TensorSpec("image_embeds", "FP32", (-1, "text_hidden"), doc="[patches / 4, hidden] merged"),
    TensorSpec("deepstack_embeds", "FP32", (3, -1, "text_hidden"), doc="features added after layers 0-2"),
)

# --- preprocess -> language_model ---------------------------------------------------------------
PROMPT_INPUTS = (
    TensorSpec("input_ids", "INT64", (-1,), doc="prompt token ids, image pads included"),
    TensorSpec("position_ids", "INT64", (3, -1), doc="M-RoPE (t, h, w) positions of the prompt"),
    TensorSpec("rope_delta", "INT64", (1,), doc="decode position = token index + rope_delta"),
)

PREPROCESS_INPUTS = ENDPOINT_INPUTS
LANGUAGE_MODEL_OUTPUTS = ENDPOINT_OUTPUTS


def preprocess_outputs(vision_in_decoder: bool) -> tuple:
    """What the preprocess model sends: the images as bytes when the decoder runs the tower, as
    the vision encoder's float pixels otherwise; the prompt's ids and positions either way."""
    return (DECODER_VISION_INPUTS if vision_in_decoder else VISION_INPUTS) + PROMPT_INPUTS
