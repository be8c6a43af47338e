"""transformers' own answers for the parity tests: the reference our server must match.

Built independently of our preprocessing: transformers' tokenizer, chat template and image
processor, then ``generate`` with ``mm_token_type_ids`` (without it, transformers silently skips
M-RoPE for the image tokens and answers differently).
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=2)
def _load(checkpoint: str):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint), AutoImageProcessor.from_pretrained(checkpoint, backend="pil")


def user_turn(prompt: str, num_images: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]}]


def greedy_tokens(checkpoint: Path, messages: list[dict], images: list[bytes], max_new_tokens: int) -> list[int]:
    """Greedy token ids transformers generates (the EOS included, if reached)."""
    from PIL import Image

    model, tokenizer, image_processor = _load(str(checkpoint))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = {}
    if images:
        batch = image_processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt")
        pads = iter(int(g.prod()) // 4 for g in batch["image_grid_thw"])
        text = "".join(
            piece if i == 0 else "<|image_pad|>" * next(pads) + piece for i, piece in enumerate(text.split("<|image_pad|>"))
        )
        kwargs = {"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == model.config.image_token_id).int(),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **kwargs,
        )
    return out[0, ids.shape[1] :].tolist()
