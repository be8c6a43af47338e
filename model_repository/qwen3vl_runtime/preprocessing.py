"""From a prompt (or chat) and image bytes to every tensor the vision encoder and decoder need.

Uses the checkpoint's own chat template, tokenizer and image processor (transformers), so the ids
and pixels are the ones transformers would build (the pixels through ``patches.PatchMaker``, the
processor's output bit for bit, faster; as bytes for a decoder that runs the tower, as floats for
the ONNX encoder); M-RoPE positions and the vision encoder's position inputs are computed in numpy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import decode_image
from .patches import PatchMaker
from .rope import mrope_positions
from .vision_inputs import PIXEL_BYTES, PIXEL_VALUES, vision_position_inputs

IMAGE_PAD = "<|image_pad|>"


class PromptError(ValueError):
    """A prompt or chat the server cannot use; the message says why."""


@dataclass(frozen=True)
class PreprocessLimits:
    max_context: int  # prompt + generated tokens
    max_pixels: int  # images above this are resized down (as the processor does), not rejected
    min_pixels: int
    max_images: int
    max_source_pixels: int  # decompression-bomb guard on the encoded image


def parse_chat(prompt: str, num_images: int) -> list[dict]:
    """A chat in the Hugging Face format from the ``prompt`` input.

    A prompt that is a JSON list of messages ({"role", "content"}) is a multi-turn chat whose
    ``{"type": "image"}`` parts take the request's images in order; any other text is one user
    turn with the images first.
    """
    text = prompt.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            messages = json.loads(text)
        except json.JSONDecodeError:
            messages = None
        if isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m for m in messages):
            _check_chat(messages, num_images)
            return messages
    if not prompt:
        raise PromptError("the prompt is empty")
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]}]


def _check_chat(messages: list[dict], num_images: int) -> None:
    image_parts = 0
    for i, message in enumerate(messages):
        if message["role"] not in ("system", "user", "assistant"):
            raise PromptError(f"chat message {i}: unknown role {message['role']!r}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise PromptError(f"chat message {i}: content must be a string or a list of parts")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                image_parts += 1
            elif kind != "text" or not isinstance(part.get("text"), str):
                raise PromptError(f"chat message {i}: parts must be {{'type': 'text', 'text': ...}} or {{'type': 'image'}}")
    if image_parts != num_images:
        raise PromptError(f"the chat has {image_parts} image part(s) but the request sent {num_images} image(s)")


class Preprocessor:
    """``preprocessor(prompt, images)`` -> the tensors of ``specs.preprocess_outputs``, from the
    processor files in ``folder``. pixel_bytes: the images as ``pixel_bytes`` (for a decoder that
    runs the tower and applies the processor's table itself) rather than float ``pixel_values``."""

    def __init__(self, folder: Path, limits: PreprocessLimits, *, pixel_bytes: bool):
        from transformers import AutoImageProcessor, AutoTokenizer

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        vision = config["vision_config"]
        self.limits = limits
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
        self.patches = PatchMaker(image_processor, min_pixels=limits.min_pixels, max_pixels=limits.max_pixels)
        self.image_token_id = config["image_token_id"]
        self.vision_start_token_id = config["vision_start_token_id"]
        self.merge = vision["spatial_merge_size"]
        self.grid_side = int(round(vision["num_position_embeddings"] ** 0.5))
        self.pixel_bytes = pixel_bytes
        # Text-only requests still pass through the vision step of the ensemble (a step cannot be
        # skipped): they carry one blank merge block of patches, which no image token consumes.
        blank_bytes = np.zeros((self.merge**2, vision.get("in_channels", 3) * vision["patch_size"] ** 2), np.uint8)
        self._blank = blank_bytes, np.array([[1, self.merge, self.merge]])

    def warm_up(self) -> None:
        """One small image request, so that the server's first requests do not pay one-time costs
        (most of it the chat template's Jinja compile, in cProfile of a first request). With eight
        preprocess instances and no warm-up, one stream's eight requests each met a cold one: 39.5
        ms of preprocess a request, 20.2 with this (H200, scripts/bench_triton.py --concurrency 1,
        run 12; docs/benchmarks.md)."""
        import io

        from PIL import Image

        png = io.BytesIO()
        Image.new("RGB", (64, 64)).save(png, format="PNG")
        self("warm-up", [png.getvalue()])

    def __call__(self, prompt: str, images: list[bytes]) -> dict[str, np.ndarray]:
        if len(images) > self.limits.max_images:
            raise PromptError(f"{len(images)} images sent; this server takes at most {self.limits.max_images}")
        messages = parse_chat(prompt, len(images))
        decoded = [decode_image(data, i, max_source_pixels=self.limits.max_source_pixels) for i, data in enumerate(images)]
        if decoded:
            try:
                patch_bytes, grid = self.patches.make(decoded)
            except ValueError as exc:  # e.g. an aspect ratio the processor refuses
                raise PromptError(f"image rejected by the image processor: {exc}") from None
        else:
            patch_bytes, grid = self._blank
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = self._expand_image_pads(text, grid if decoded else grid[:0])
        input_ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        if len(input_ids) >= self.limits.max_context:
            raise PromptError(
                f"the prompt is {len(input_ids)} tokens (images included); this server's max context is "
                f"{self.limits.max_context} tokens, prompt and answer together"
            )
        positions, rope_delta = mrope_positions(
            input_ids,
            grid if decoded else grid[:0],
            spatial_merge_size=self.merge,
            image_token_id=self.image_token_id,
            vision_start_token_id=self.vision_start_token_id,
        )
        pixels = {PIXEL_BYTES: patch_bytes} if self.pixel_bytes else {PIXEL_VALUES: self.patches.pixel_values(patch_bytes)}
        return {
            **pixels,
            **vision_position_inputs(grid, num_grid_per_side=self.grid_side, spatial_merge_size=self.merge),
            "input_ids": input_ids,
            "position_ids": positions,
            "rope_delta": np.array([rope_delta], dtype=np.int64),
        }

    def _expand_image_pads(self, text: str, grid: np.ndarray) -> str:
        """One ``<|image_pad|>`` per image becomes t*h*w / merge^2 of them, as the processor does."""
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(grid):
            raise PromptError(f"the chat template placed {len(pieces) - 1} images for {len(grid)} sent")
        counts = [int(g.prod()) // self.merge**2 for g in grid]
        return pieces[0] + "".join(IMAGE_PAD * n + piece for n, piece in zip(counts, pieces[1:]))
