"""The int8 KV cache (build-repo --kv-cache-dtype int8): its rounding, its reads, and its accuracy.

The GPU kernel that writes it runs through Triton's interpreter against the reference in
tests/test_fused_interpreted.py (with the attention kernels that read it), and again on CUDA in
tests/test_gpu.py; the engine's answers over it are checked for independence from batching in
tests/test_engine.py.
"""

from __future__ import annotations

import pytest
import torch

from builder.quantize import accuracy_token_sequences, measure_accuracy
from model_repository.qwen3vl_runtime.kv_cache import LayerCache, is_quantized, quantize


def test_quantize_keeps_each_vector_within_half_a_step_of_its_own_scale():
    x = torch.randn(4, 3, 128) * torch.logspace(-3, 2, 4)[:, None, None]  # vectors of very different sizes
    x[1, 2] = 0.0  # an all-zero vector: scale 0, no division by zero
    q, scale = quantize(x)
    assert q.dtype == torch.int8 and scale.shape == (4, 3) and int(q.abs().max()) == 127
    restored = q.float() * scale[..., None]
    assert bool(((restored - x).abs() <= scale[..., None] / 2 * (1 + 1e-6)).all())
    assert float(scale[1, 2]) == 0.0 and bool((q[1, 2] == 0).all())


def test_a_quantized_layer_cache_writes_and_reads_back_what_it_stores():
    cache = LayerCache.empty(3, 2, 8, 16, dtype=torch.float32, quantized=True, device="cpu")
    assert cache.quantized and cache.k.dtype == torch.int8 and cache.k_scale.shape == (3, 2, 8)
    assert cache.nbytes() == 2 * (3 * 2 * 8 * 16 + 3 * 2 * 8 * 4)  # 16 bytes + a float32 scale per vector
    k, v = torch.randn(2, 5, 16), torch.randn(2, 5, 16)  # one slot's 5 positions
    cache.write((1, slice(None), slice(2, 7)), k, v)
    keys, values = cache.read((1, slice(None), slice(2, 7)), torch.float32)
    for restored, x in ((keys, k), (values, v)):
        q, scale = quantize(x)
        assert torch.equal(restored, q.float() * scale[..., None])
    plain = LayerCache.empty(3, 2, 8, 16, dtype=torch.bfloat16, quantized=False, device="cpu")
    plain.write((0, slice(None), slice(0, 5)), k, v)
    assert not plain.quantized and torch.equal(plain.read((0, slice(None), slice(0, 5)), torch.bfloat16)[0], k.to(torch.bfloat16))


def test_kv_cache_dtype_names():
    assert not is_quantized("auto") and is_quantized("int8")
    with pytest.raises(ValueError, match="unknown KV cache dtype 'fp8'; expected one of auto, int8"):
        is_quantized("fp8")


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
# test_quant.py). Measured here against transformers float32: top-1 0.976, mean cosine 0.99988, min 0.99922
# (int8 weights on the same model: 0.91 / 0.9992). A trained model's margins are wider; the
# build measures its own figure into the manifest.
INT8_CACHE_BOUNDS = {"top1_agreement": 0.93, "mean_logit_cosine": 0.9995, "min_logit_cosine": 0.995}


def test_int8_cache_accuracy_against_transformers(served):
    model, hf, tokenizer = served
    sequences = accuracy_token_sequences(tokenizer)
    with torch.no_grad():
        reference = lambda ids: hf(input_ids=ids).logits[0]  # noqa: E731
        exact = measure_accuracy(reference, lambda ids: model.sequence_logits(ids[0]), sequences)
        int8 = measure_accuracy(reference, lambda ids: model.sequence_logits(ids[0], quantized_kv=True), sequences)
    print(int8)
    assert exact["top1_agreement"] == 1.0  # the float32 cache is transformers' own result
    for metric, bound in INT8_CACHE_BOUNDS.items():
        assert int8[metric] >= bound, (metric, int8)
    assert int8["mean_logit_cosine"] < exact["mean_logit_cosine"]  # the cache really is rounded
