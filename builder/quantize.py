"""Offline phase of the decoder's 8-bit quantization, and the accuracy check of its result.

``quantize_state_dict`` turns a checkpoint's float state dict into the one the runtime loads
with ``qwen3vl_runtime.quant.swap_in_quantized``; ``measure_accuracy`` compares the logits of
the quantized decoder with the float one, teacher-forced on fixed prompts, for the build report.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from model_repository.qwen3vl_runtime.quant import quantize_weight

# Checkpoint key names (Qwen3VLForConditionalGeneration, transformers 5 layout).
DECODER_PREFIX = "model.language_model."
EMBEDDING = "model.language_model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def is_decoder_matrix(name: str, tensor: torch.Tensor) -> bool:
    """Default predicate: a 2-D float weight of the text decoder (its Linear layers and the token
    embedding, which the tied lm_head reads too) or an untied lm_head.

    The vision tower is left alone: it runs in ONNX Runtime, compute-bound, where weight-only
    quantization saves nothing. Norms (1-D) stay float.
    """
    return (
        tensor.ndim == 2
        and tensor.is_floating_point()
        and name.endswith(".weight")
        and (name.startswith(DECODER_PREFIX) or name == LM_HEAD)
    )


def quantize_state_dict(
    state_dict: dict[str, torch.Tensor],
    mode: str,
    *,
    should_quantize: Callable[[str, torch.Tensor], bool] = is_decoder_matrix,
) -> dict[str, torch.Tensor]:
    """Quantize the weights ``should_quantize(name, tensor)`` selects; pass the rest through.

    A selected ``<name>.weight`` becomes ``<name>.weight`` (int8 / float8_e4m3fn, [out, in]) plus
    ``<name>.weight_scale`` (float32, [out]). An ``lm_head.weight`` tied to the embedding (the
    same tensor, as ``model.state_dict()`` gives it) is dropped, as ``save_pretrained`` does:
    the runtime's head reads the embedding's quantized table, so it is stored once.
    """
    out = {}
    for name, tensor in state_dict.items():
        if name == LM_HEAD and _tied_to_embedding(tensor, state_dict.get(EMBEDDING)):
            continue
        if not should_quantize(name, tensor):
            out[name] = tensor
            continue
        if not name.endswith(".weight"):
            raise ValueError(f"{name}: only '<module>.weight' tensors can be quantized")
        out[name], out[f"{name.removesuffix('.weight')}.weight_scale"] = quantize_weight(tensor, mode)
    return out


def _tied_to_embedding(head: torch.Tensor, embedding: torch.Tensor | None) -> bool:
    if embedding is None or head.shape != embedding.shape:
        return False
    return head.data_ptr() == embedding.data_ptr() or torch.equal(head, embedding)


# Fixed, varied texts for the accuracy report: prose, code, Chinese, math, structured data.
ACCURACY_PROMPTS = (
    "Explain in a few sentences why the sky looks blue during the day but red and orange at "
    "sunset, and mention what role the thickness of the atmosphere plays.",
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n    i = j = 0\n    out = []\n"
    "    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n"
    "        else:\n            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n# Is this correct?",
    "请用简洁的中文介绍一下长城的历史，包括它最初修建的原因、主要的朝代，以及它今天作为旅游景点的意义。",
    "Solve step by step: a train leaves at 08:15 and travels 342 km at an average speed of "
    "76 km/h. At what time does it arrive, and how many minutes late is it if it was due at 12:30?",
    '{"order_id": 10482, "customer": {"name": "Ana Souza", "city": "Porto"}, "items": '
    '[{"sku": "KB-204", "qty": 2, "price": 39.9}, {"sku": "MS-11", "qty": 1, "price": 19.5}]} '
    "Summarise this order and compute its total.",
    "Write a short, friendly email to a colleague asking to move tomorrow's 10 o'clock meeting "
    "to Thursday afternoon because the client demo was rescheduled.",
    "SELECT c.name, COUNT(o.id) AS orders FROM customers c LEFT JOIN orders o ON o.customer_id = c.id "
    "WHERE o.created_at >= '2024-01-01' GROUP BY c.name HAVING COUNT(o.id) > 3 ORDER BY orders DESC; "
    "What does this query return, and is the LEFT JOIN still meaningful here?",
    "翻译成英文并解释其含义：“学而不思则罔，思而不学则殆。”这句话出自哪本书？",
)


def accuracy_token_sequences(tokenizer, min_positions: int = 256) -> list[list[int]]:
    """Token ids of each ACCURACY_PROMPTS text as a user turn of the chat template.

    Raises ValueError if together they give fewer than ``min_positions`` tokens.
    """
    sequences = []
    for prompt in ACCURACY_PROMPTS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        sequences.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    _check_positions(sequences, min_positions)
    return sequences


def _check_positions(token_sequences: list[list[int]], min_positions: int) -> int:
    positions = sum(len(ids) for ids in token_sequences)
    if positions < min_positions:
        raise ValueError(f"accuracy needs at least {min_positions} positions, the sequences give {positions}")
    return positions


@torch.no_grad()
def measure_accuracy(
    reference_logits: Callable[[torch.Tensor], torch.Tensor],
    candidate_logits: Callable[[torch.Tensor], torch.Tensor],
    token_sequences: list[list[int]],
    *,
    min_positions: int = 256,
) -> dict:
    """Teacher-forced agreement of two decoders over every position of ``token_sequences``.

    Each callable takes input ids [1, L] (int64, CPU; move them where the model lives) and
    returns logits [L, V]. Both see the same tokens, so errors do not compound through
    different continuations. Returns ``positions``, ``top1_agreement`` (fraction of positions
    with the same argmax), ``mean_logit_cosine`` / ``min_logit_cosine`` (per-position cosine of
    the logit vectors) and ``max_abs_logit_error``. Raises ValueError below ``min_positions``.
    """
    positions = _check_positions(token_sequences, min_positions)
    agree, cosines, max_error = 0, [], 0.0
    for ids in token_sequences:
        input_ids = torch.tensor([ids], dtype=torch.long)  # [1, L]
        ref = reference_logits(input_ids).float()  # [L, V]
        cand = candidate_logits(input_ids).float().to(ref.device)  # [L, V]
        if ref.shape != cand.shape or ref.shape[0] != len(ids):
            raise ValueError(f"logits must be [L={len(ids)}, V]: got {tuple(ref.shape)} and {tuple(cand.shape)}")
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        cosines.append(F.cosine_similarity(ref, cand, dim=-1))  # [L]
        max_error = max(max_error, float((ref - cand).abs().max()))
    cosine = torch.cat(cosines)  # [positions]
    return {
        "positions": positions,
        "top1_agreement": agree / positions,
        "mean_logit_cosine": float(cosine.mean()),
        "min_logit_cosine": float(cosine.min()),
        "max_abs_logit_error": max_error,
    }
