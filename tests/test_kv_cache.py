"""The fp8 KV cache (build-repo --kv-cache-dtype fp8): its rounding, and its accuracy on the tiny model.

The GPU kernel that writes it is compared with ``to_cache`` in tests/test_gpu.py (Triton's
interpreter rounds float32 to fp8 wrongly, so it cannot stand in here); the attention kernels
that read it run through the interpreter in tests/test_fused_interpreted.py, and the engine's
answers over it are checked for independence from batching in tests/test_engine.py.
"""

from __future__ import annotations

import pytest
import torch

from builder.quantize import accuracy_token_sequences, measure_accuracy
from model_repository.qwen3vl_runtime.kv_cache import FP8, kv_cache_dtype, to_cache


def test_to_cache_rounds_to_nearest_even_and_saturates():
    x = torch.tensor([0.1, -3.3, 100.0, 447.0, 500.0, -1e4, 1e-3, 0.0])
    stored = to_cache(x, torch.empty(0, dtype=FP8))
    assert stored.dtype == FP8
    # 100 lies halfway between 96 and 104: even mantissa; past 448, 448
    assert stored.float().tolist() == pytest.approx([0.1015625, -3.25, 96.0, 448.0, 448.0, -448.0, 0.001953125, 0.0])
    same = torch.empty(0, dtype=torch.bfloat16)
    assert to_cache(x, same).dtype == torch.bfloat16 and torch.equal(to_cache(x, same), x.to(torch.bfloat16))


def test_kv_cache_dtype_names():
    assert kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_cache_dtype("fp8", torch.float32) == FP8
    with pytest.raises(ValueError, match="unknown KV cache dtype 'int4'; expected one of auto, fp8"):
        kv_cache_dtype("int4", torch.bfloat16)


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    """Our float32 decoder of the tiny checkpoint, transformers' float32 model and the tokenizer."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from builder.decoder_export import write_decoder
    from model_repository.qwen3vl_runtime.decoder_weights import load_text_model

    folder = tmp_path_factory.mktemp("decoder")
    write_decoder(tiny_checkpoint, folder, quantization="none", dtype="float32")
    hf = Qwen3VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    return load_text_model(folder), hf, AutoTokenizer.from_pretrained(tiny_checkpoint)


# The tiny model's logits are large and its top-1 margins thin (initializer_range 0.5, see
# test_quant.py): measured here top-1 0.857, mean cosine 0.997 against transformers (int8 weights:
# 0.91 / 0.9992; fp8 weights: 0.66 / 0.988). A trained model's margins are wider; the build
# measures its own figure into the manifest.
FP8_CACHE_BOUNDS = {"top1_agreement": 0.8, "mean_logit_cosine": 0.993, "min_logit_cosine": 0.95}


def test_fp8_cache_accuracy_against_transformers(served):
    model, hf, tokenizer = served
    sequences = accuracy_token_sequences(tokenizer)
    with torch.no_grad():
        reference = lambda ids: hf(input_ids=ids).logits[0]  # noqa: E731
        exact = measure_accuracy(reference, lambda ids: model.sequence_logits(ids[0]), sequences)
        fp8 = measure_accuracy(reference, lambda ids: model.sequence_logits(ids[0], FP8), sequences)
    print(fp8)
    assert exact["top1_agreement"] == 1.0  # the float32 cache is transformers' own result
    for metric, bound in FP8_CACHE_BOUNDS.items():
        assert fp8[metric] >= bound, (metric, fp8)
    assert fp8["mean_logit_cosine"] < exact["mean_logit_cosine"]  # the cache really is rounded
