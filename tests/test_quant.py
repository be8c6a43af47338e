"""Weight-only int8 / fp8: round-trip bounds, the runtime modules, and accuracy on the tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from builder.quantize import (
    EMBEDDING,
    LM_HEAD,
    accuracy_token_sequences,
    measure_accuracy,
    quantize_state_dict,
)
from model_repository.qwen3vl_runtime.quant import (
    QuantEmbedding,
    QuantLinear,
    QuantTiedHead,
    dequantize_weight,
    quantize_weight,
    swap_in_quantized,
)

MODES = ("int8", "fp8")


def sample_weight(rows: int = 64, cols: int = 96, seed: int = 0) -> torch.Tensor:
    """Gaussian rows of different scales, one outlier, one all-zero row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows)[:, None]  # [rows, cols]
    w[3, 7] = 40.0
    w[5] = 0.0
    return w


# --- quantize / dequantize ----------------------------------------------------------------------


def test_int8_round_trip_within_half_a_step():
    w = sample_weight()
    q, scale = quantize_weight(w, "int8")
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (w.shape[0],)
    assert q.abs().max() <= 127
    # Each nonzero row uses the full grid: its absmax lands on +-127.
    nonzero = w.abs().amax(1) > 0
    assert (q.abs().amax(1)[nonzero] == 127).all()
    error = (dequantize_weight(q, scale, torch.float32) - w).abs()  # [out, in]
    assert (error <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert (dequantize_weight(q, scale, torch.float32)[5] == 0).all()


def test_fp8_round_trip_within_half_an_ulp():
    w = sample_weight()
    q, scale = quantize_weight(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (w.shape[0],)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals; below the smallest normal
    # (2^-6 of scale units) the grid is uniform with step 2^-9, so half a step is 2^-10 * scale.
    bound = torch.maximum(w.abs() * 2**-4, scale[:, None] * 2**-10) * (1 + 1e-5)
    error = (dequantize_weight(q, scale, torch.float32) - w).abs()
    assert (error <= bound).all()
    assert (q.float().abs().amax(1)[w.abs().amax(1) > 0] == 448).all()


@pytest.mark.parametrize("mode", MODES)
def test_bf16_weights_quantize_like_their_fp32_values(mode):
    w = sample_weight().to(torch.bfloat16)
    q16, s16 = quantize_weight(w, mode)
    q32, s32 = quantize_weight(w.float(), mode)
    assert torch.equal(q16.view(torch.int8), q32.view(torch.int8)) and torch.equal(s16, s32)


def test_quantize_weight_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown quantization mode"):
        quantize_weight(sample_weight(), "int4")
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.ones(2, 3, 4), "int8")


# --- runtime modules ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_quant_linear_equals_dequantized_linear(mode):
    w = sample_weight()
    q, scale = quantize_weight(w, mode)
    bias = torch.randn(w.shape[0])
    layer = QuantLinear(q, scale, bias)
    x = torch.randn(2, 5, w.shape[1])  # [B, S, in]
    expected = nn.functional.linear(x, dequantize_weight(q, scale, torch.float32), bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
    assert (layer.in_features, layer.out_features) == (w.shape[1], w.shape[0])
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", MODES)
def test_quant_embedding_lookup_and_tied_logits(mode):
    table = sample_weight(rows=50, cols=16)  # [vocab, hidden]
    q, scale = quantize_weight(table, mode)
    dequantized = dequantize_weight(q, scale, torch.float32)
    embedding = QuantEmbedding(q, scale)
    ids = torch.tensor([[0, 3, 5, 49], [7, 7, 1, 2]])  # [B, S]
    torch.testing.assert_close(embedding(ids), dequantized[ids], rtol=0, atol=0)
    hidden = torch.randn(2, 4, 16)  # [B, S, hidden]
    torch.testing.assert_close(QuantTiedHead(embedding)(hidden), hidden @ dequantized.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_to_dtype_keeps_quantized_storage(mode):
    """model.to(torch.bfloat16) must not turn fp8 weights into bf16 or round the fp32 scales."""
    q, scale = quantize_weight(sample_weight(), mode)
    model = nn.ModuleDict({"linear": QuantLinear(q, scale), "embed": QuantEmbedding(q.clone(), scale.clone())})
    model.to(torch.bfloat16)
    for layer in model.values():
        assert layer.weight.dtype == q.dtype and torch.equal(layer.weight.view(torch.int8), q.view(torch.int8))
        assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert model["embed"](torch.tensor([1, 2])).dtype == torch.bfloat16
    model.float()
    assert model["embed"](torch.tensor([1, 2])).dtype == torch.float32


def test_swap_into_module_built_on_meta():
    """Modules built on the meta device (fast init) get the state dict's real tensors."""
    w, bias = sample_weight(), torch.randn(64)
    q, scale = quantize_weight(w, "int8")
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(96, 64))
    swap_in_quantized(model, {"0.weight": q, "0.weight_scale": scale, "0.bias": bias}, "int8")
    x = torch.randn(4, 96)
    torch.testing.assert_close(model(x), x @ dequantize_weight(q, scale, torch.float32).T + bias, rtol=1e-5, atol=1e-4)


# --- the tiny Qwen3-VL --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """The float tiny model (from conftest's shared demo checkpoint) and its tokenizer."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_checkpoint)


def quantized_copy(model: nn.Module, mode: str) -> tuple[nn.Module, dict]:
    state_dict = quantize_state_dict(model.state_dict(), mode)
    # The copy already holds the float tensors; swap_in_quantized reads only the quantized pairs.
    quantized = swap_in_quantized(copy.deepcopy(model), state_dict, mode)
    return quantized, state_dict


def logits_fn(model: nn.Module):
    return lambda ids: model(input_ids=ids).logits[0]  # [1, L] -> [L, V]


def test_quantize_state_dict_selects_decoder_matrices(tiny):
    model, _ = tiny
    float_sd = model.state_dict()
    assert float_sd[LM_HEAD].data_ptr() == float_sd[EMBEDDING].data_ptr()  # tied: one Parameter
    state_dict = quantize_state_dict(float_sd, "int8")
    assert LM_HEAD not in state_dict  # tied: the head reads the embedding's quantized table
    quantized = {k.removesuffix("_scale") for k in state_dict if k.endswith(".weight_scale")}
    layers = model.config.text_config.num_hidden_layers
    assert len(quantized) == 7 * layers + 1  # q, k, v, o, gate, up, down per layer + embedding
    for name in quantized:
        assert state_dict[name].dtype == torch.int8 and state_dict[f"{name}_scale"].dtype == torch.float32
    kept = set(float_sd) - quantized - {LM_HEAD}
    assert all(state_dict[k] is float_sd[k] for k in kept)  # norms, vision tower: untouched
    assert any(k.startswith("model.visual.") for k in kept)

    untied = dict(float_sd, **{LM_HEAD: float_sd[EMBEDDING].clone() + 1})
    assert quantize_state_dict(untied, "fp8")[LM_HEAD].dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("mode", MODES)
def test_swapped_model_computes_the_dequantized_model(tiny, mode):
    """The quantized modules, tied head included, are exactly the dequantized float model."""
    model, tokenizer = tiny
    quantized, state_dict = quantized_copy(model, mode)
    text = quantized.model.language_model
    assert isinstance(text.embed_tokens, QuantEmbedding)
    assert isinstance(quantized.lm_head, QuantTiedHead) and quantized.lm_head.embedding is text.embed_tokens
    assert sum(isinstance(m, QuantLinear) for m in text.modules()) == 7 * len(text.layers)

    dequantized = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in dequantized.named_modules():
            if f"{name}.weight_scale" in state_dict:
                q, scale = state_dict[f"{name}.weight"], state_dict[f"{name}.weight_scale"]
                module.weight.copy_(dequantize_weight(q, scale, torch.float32))  # also the tied head
    ids = torch.tensor([accuracy_token_sequences(tokenizer)[0]])  # [1, L]
    with torch.no_grad():
        torch.testing.assert_close(logits_fn(quantized)(ids), logits_fn(dequantized)(ids), rtol=1e-4, atol=1e-3)


# Measured on the tiny model (seed 0, 498 positions, torch 2.13 CPU):
#   int8: top-1 0.914, mean cosine 0.99918, min cosine 0.9956, max |error| 2.63
#   fp8:  top-1 0.665, mean cosine 0.98775, min cosine 0.9544, max |error| 7.88
# Cosine is the bound that matters: e4m3 keeps 3 mantissa bits (~2.5% rms relative weight
# error) against int8's ~0.6% on these Gaussian rows, and 1 - cosine grows with its square.
# Top-1 is loose on purpose: this random model's logits over 151,936 tokens are flat (median
# top-1/top-2 gap 0.92 for a logit std of 5.7; 31% of positions under 0.5), and every int8 flip
# was at a gap under 0.45. A trained model's gaps are far larger; its real figure comes from the
# build's accuracy report.
BOUNDS = {
    "int8": {"top1_agreement": 0.85, "mean_logit_cosine": 0.998, "min_logit_cosine": 0.99},
    "fp8": {"top1_agreement": 0.55, "mean_logit_cosine": 0.98, "min_logit_cosine": 0.93},
}


def test_accuracy_against_float_model(tiny):
    model, tokenizer = tiny
    sequences = accuracy_token_sequences(tokenizer)
    reports = {}
    for mode in MODES:
        quantized, _ = quantized_copy(model, mode)
        reports[mode] = measure_accuracy(logits_fn(model), logits_fn(quantized), sequences)
        print(mode, reports[mode])
    for mode, report in reports.items():
        assert report["positions"] >= 256
        for metric, bound in BOUNDS[mode].items():
            assert report[metric] >= bound, (mode, metric, report)
    assert reports["int8"]["mean_logit_cosine"] > reports["fp8"]["mean_logit_cosine"]


def test_measure_accuracy_needs_enough_positions(tiny):
    model, _ = tiny
    same = logits_fn(model)
    report = measure_accuracy(same, same, [[1, 2, 3]] * 2, min_positions=6)
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_error"] == 0.0
    with pytest.raises(ValueError, match="at least 256 positions"):
        measure_accuracy(same, same, [[1, 2, 3]] * 2)


def test_swap_rejects_mismatched_tensors(tiny):
    model, _ = tiny
    state_dict = quantize_state_dict(model.state_dict(), "int8")
    name = "model.language_model.layers.0.mlp.up_proj"
    pair = {f"{name}.weight": state_dict[f"{name}.weight"], f"{name}.weight_scale": state_dict[f"{name}.weight_scale"]}
    with pytest.raises(ValueError, match="mode 'fp8' stores"):
        swap_in_quantized(copy.deepcopy(model), pair, "fp8")
    with pytest.raises(ValueError, match="match no Linear"):
        swap_in_quantized(copy.deepcopy(model), {k.replace("up_proj", "upproj"): v for k, v in pair.items()}, "int8")


def test_decode_tuner_splits_k_only_to_fill_the_gpu_and_only_where_it_clearly_wins():
    """The 8-bit decode kernels' candidates and pick (kernels/int8_matmul.py; timed on the GPU only)."""
    from model_repository.qwen3vl_runtime.kernels.int8_matmul import MIN_SPLIT_GAIN, Launch, candidates, pick

    # o (2,048 x 2,048) on 132 SMs: 32-row tiles give 64 programs, split four ways (two 256-steps
    # each), for either weight conversion and in both tensor-core kernels; lm_head's 151,936 rows
    # fill the GPU unsplit; no SM count (the CPU): nothing split
    o = {(c.kernel, c.block_n, c.block_k, c.convert): c.split_k for c in candidates(4, torch.int8, 2048, 2048, 132) if c.split_k > 1}
    assert o[("tensor_cores", 32, 256, "bf16")] == 4 and o[("tensor_cores", 32, 256, "f16_ptx")] == 4 and o[("weight_major", 64, 128, "f16_ptx")] == 8
    assert not [c for c in candidates(4, torch.int8) if c.convert == "f16_bits"]  # the interpreter's form only
    assert not [c for c in candidates(4, torch.int8, 151936, 2048, 132) if c.split_k > 1]
    assert all(c.split_k == 1 for c in candidates(4, torch.int8))
    whole, split = Launch("few_rows", 1, 4, 1024), Launch("few_rows", 1, 4, 1024, split_k=2)
    assert (whole.label, split.family) == ("few_rows 4x1024 w4 s4 k/1", "few_rows/split-k")  # the tuner's log line, bench tables
    assert Launch("tensor_cores", 64, convert="f16_ptx", split_k=2).family == "tc/f16_ptx/split-k"
    assert pick([(whole, 9.5), (split, 9.5)]) is whole  # a tie: the launch fewer wins
    assert pick([(whole, 10.0), (split, 10.0 * (1 - MIN_SPLIT_GAIN) + 0.01)]) is whole
    assert pick([(whole, 10.0), (split, 8.0)]) is split


def test_prefill_sizes_default_to_dequantizing_and_offer_the_int8x2_kernel():
    """Above DECODE_MAX_ROWS rows: "dequantize" first (what runs untuned), int8x2 tiles for int8 W."""
    from model_repository.qwen3vl_runtime.kernels.int8_matmul import DECODE_MAX_ROWS, DEQUANTIZE_MAX_ELEMENTS, candidates

    int8 = candidates(2 * DECODE_MAX_ROWS, torch.int8, 4096, 2048, 132)
    assert int8[0].kernel == "dequantize" and int8[0].family == "dequantize"
    assert {c.convert for c in int8[1:]} == {"int8x2"} and all(c.block_k <= 256 for c in int8[1:])
    assert [c.kernel for c in candidates(4096, torch.float8_e4m3fn, 4096, 2048)] == ["dequantize"]
    # the tied lm_head is too large to dequantize per call: only the kernels that read it as it is
    assert all(c.kernel != "dequantize" for c in candidates(128, torch.int8, DEQUANTIZE_MAX_ELEMENTS // 1024 + 1, 1024))
    assert candidates(DECODE_MAX_ROWS, torch.int8)[0].kernel == "tensor_cores"  # decode sizes as before


def test_tuning_cache_keeps_picks_per_fingerprint(tmp_path, monkeypatch):
    """kernels/tuning_cache.py on its own (the GPU path that fills it needs CUDA)."""
    from model_repository.qwen3vl_runtime.kernels import tuning_cache
    from model_repository.qwen3vl_runtime.kernels.int8_matmul import Launch

    path = tmp_path / "cache" / "tuning.json"
    monkeypatch.setenv(tuning_cache.ENV, str(path))
    key = (4, 2048, 6144, torch.int8, torch.bfloat16)
    launch = Launch("weight_major", 16, 64, 256, 4, 3, split_k=8)
    assert tuning_cache.lookup("gpu-a", key) is None  # no file yet
    tuning_cache.store("gpu-a", key, launch)
    assert Launch(**tuning_cache.lookup("gpu-a", key)) == launch
    assert tuning_cache.lookup("gpu-b", key) is None  # another GPU or other kernel code
    tuning_cache.store("gpu-b", key, launch)  # replaces the file: gpu-a's entries go
    assert tuning_cache.lookup("gpu-a", key) is None and tuning_cache.lookup("gpu-b", key) is not None
    path.write_text("{not json")  # a broken file is skipped, then rewritten
    assert tuning_cache.lookup("gpu-b", key) is None
    tuning_cache.store("gpu-b", key, launch)
    assert tuning_cache.lookup("gpu-b", key) is not None
    monkeypatch.setenv(tuning_cache.ENV, "")  # off
    assert tuning_cache.cache_path() is None and tuning_cache.lookup("gpu-b", key) is None
