"""The GPU prefill (fused Triton kernels, prompts batched) on the CPU, through Triton's interpreter.

CI has no GPU, so without this the batched prefill (prompts of one length attended as one batch,
ragged ones grouped by length, grouped-query heads, deepstack rows), the int8 product of many
rows (a dequantizing kernel, then a dense product), the decode-sized kernels (whole and split over
K; x prescaled into fp16 or split into two int8 terms), the decode attention (whole and split over the keys), a captured prefill's prompt attention (the prefill and both attentions also over an int8 cache) and the vision tower's rotary kernel
would only be tested on the GPU machine. TRITON_INTERPRET must be set before Triton compiles
anything: the comparison runs in a child process (this file run as a script), and the test reads
its verdict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fused_prefill_and_int8_product_match_the_reference(tiny_checkpoint):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, str(tiny_checkpoint)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    fp16_operands = {name: e for name, e in errors.items() if "convert='f16" in name}
    int8_terms = {name: e for name, e in errors.items() if "int8x2" in name}
    prefill = 1 + 6  # dequantize, the int8x2 prefill tiles
    assert len(errors) == 1 + 5 + 3 + 2 + 2 * 6 + 2 + prefill + 3 + 5 + 1 + 4 + 1 + 2 + 4 + 2 and (len(fp16_operands), len(int8_terms)) == (3 + 3 + 1 + 2, 4 + 4 + 1 + 6), errors
    # float32 activations rounded to fp16 operands: ~2^-11 relative; as two int8 terms, 16 bits per
    # group of K: half a step is 2^-16 of the group's largest, ~2e-5 of these products (measured
    # 2.0-2.5e-5); everything else float32 throughout
    assert max(fp16_operands.values()) < 2e-3, fp16_operands
    assert max(int8_terms.values()) < 1e-4, int8_terms
    assert max(e for name, e in errors.items() if name not in fp16_operands and name not in int8_terms) < 1e-5, errors


# One tile of each kernel and conversion (the interpreter is slow): K = 160 is not a multiple of
# either BLOCK_K, so the masked tail of K is covered too, and N = 96 that of N.
INTERPRETED = {("tensor_cores", 32, 256), ("weight_major", 64, 128), ("few_rows", 4, 512), ("few_rows", 32, 128)}


def _compare(checkpoint: Path) -> dict[str, float]:
    """Relative error of the fused prefill's logits (and first layer's keys and values) against the
    model's own one-prompt prefill: one prompt with image rows, five ragged prompts (86 rows: the
    kernel that takes every head of a row at once), three of one length."""
    import tempfile
    from dataclasses import replace

    import torch

    from builder.decoder_export import write_decoder
    from model_repository.qwen3vl_runtime.decoder_weights import load_text_model
    from model_repository.qwen3vl_runtime.fused_forward import fused_prefill
    from model_repository.qwen3vl_runtime.kernels.decode_attention import decode_attention
    from model_repository.qwen3vl_runtime.kernels.int8_matmul import DECODE_MAX_ROWS, Launch, candidates, int8_matmul, prefill_candidates, rows_bucket, split_terms
    from model_repository.qwen3vl_runtime.kernels.prompt_attention import prompt_attention, tile_table
    from model_repository.qwen3vl_runtime.kernels.vision_rope import vision_rope
    from model_repository.qwen3vl_runtime.kv_cache import LayerCache, quantize
    from model_repository.qwen3vl_runtime.quant import dequantize_weight, quantize_weight
    from model_repository.qwen3vl_runtime.text_model import sdpa_decode_attention, sdpa_prompt_attention
    from model_repository.qwen3vl_runtime.vision_tower import rotate_qk

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    with tempfile.TemporaryDirectory() as folder:
        write_decoder(checkpoint, Path(folder), quantization="none", dtype="float32")
        model = load_text_model(Path(folder), "cpu")
    assert model.config.num_kv_heads < model.config.num_heads  # grouped-query attention is covered
    errors = {}
    with torch.inference_mode():
        torch.manual_seed(0)
        n = 40
        ids = torch.randint(100, 5000, (n,))
        positions = torch.arange(n).expand(3, -1).clone()
        positions[1:, 10:14] += 1
        visual = torch.zeros(n, dtype=torch.bool)
        visual[10:14] = True
        deepstack = torch.randn(3, 4, model.config.hidden_size)
        kv_ref, kv_fused = model.new_cache(3, 128), model.new_cache(3, 128)
        ref = model.prefill(model.embed(ids), positions, kv_ref, 1, visual_mask=visual, deepstack=deepstack)
        fused = fused_prefill(model, kv_fused, model.embed(ids), positions, [1], [n], visual.nonzero().flatten(), deepstack)[0]
        errors["image prompt"] = rel(fused, ref)
        # over an int8 cache (kv_cache.py): the kernel quantizes as the reference does
        kv_ref, kv_fused = model.new_cache(3, 128, quantized=True), model.new_cache(3, 128, quantized=True)
        ref = model.prefill(model.embed(ids), positions, kv_ref, 1, visual_mask=visual, deepstack=deepstack)
        fused = fused_prefill(model, kv_fused, model.embed(ids), positions, [1], [n], visual.nonzero().flatten(), deepstack)[0]
        cached = [rel(a.read((1, slice(None), slice(None, n)), torch.float32)[kv], b.read((1, slice(None), slice(None, n)), torch.float32)[kv])
                  for a, b in zip(kv_fused, kv_ref) for kv in (0, 1)]  # fmt: skip
        errors["image prompt, int8 cache"] = max(rel(fused, ref), *cached)
        for name, lengths in (("ragged", [7, 30, 12, 7, 30]), ("equal", [9, 9, 9])):
            slots = list(range(len(lengths)))[::-1]
            prompts = [torch.randint(100, 5000, (length,)) for length in lengths]
            positions = [torch.arange(length).expand(3, -1) for length in lengths]
            kv_batch, kv_single = model.new_cache(len(lengths), 64), model.new_cache(len(lengths), 64)
            batched = fused_prefill(model, kv_batch, model.embed(torch.cat(prompts)), torch.cat(positions, 1), slots, lengths)
            for row, (slot, prompt, position) in enumerate(zip(slots, prompts, positions)):
                single = model.prefill(model.embed(prompt), position, kv_single, slot)
                keys, values = (rel(getattr(kv_batch[0], kv)[slot, :, : len(prompt)], getattr(kv_single[0], kv)[slot, :, : len(prompt)]) for kv in "kv")
                errors[f"{name} {row}"] = max(rel(batched[row], single), keys, values)
        q, scale = quantize_weight(torch.randn(96, 160), "int8")
        x = torch.randn(DECODE_MAX_ROWS + 36, 160)
        errors["int8 product, many rows"] = rel(int8_matmul(x, q, scale), x.double() @ dequantize_weight(q, scale, torch.float64).T)
        bias = torch.randn(96)
        errors["int8 product and bias, many rows"] = rel(int8_matmul(x, q, scale, bias=bias), x.double() @ dequantize_weight(q, scale, torch.float64).T + bias.double())
        # ... and every launch the GPU's tuner may pick for those rows (a partial row tile, K in a
        # whole and a partial group)
        expected = x.double() @ dequantize_weight(q, scale, torch.float64).T
        for launch in prefill_candidates(torch.int8, q.numel()):
            out = torch.empty(len(x), 96)
            launch(x, q, scale, out)
            errors[f"int8 prefill {launch.label}"] = rel(out, expected)
        # Decode-sized products: every kernel the GPU's tuner may pick (PTX has no interpreter)
        x = torch.randn(3, 160)
        expected = x.double() @ dequantize_weight(q, scale, torch.float64).T
        for launch in candidates(rows_bucket(3), torch.int8):
            if launch.convert != "f16_ptx" and (launch.kernel, launch.block_n, launch.block_k) in INTERPRETED:
                # split over K too: two BLOCK_K = 128 steps of 128 and 32, or one BLOCK_K = 256 or
                # 512 step and an empty second split (zeros)
                for split in (launch, replace(launch, split_k=2)):
                    out = torch.empty(3, 96)
                    split(x, q, scale, out)
                    errors[f"int8 {split}"] = rel(out, expected)
        # x scaled into fp16 by its own kernel: rows far past fp16's 65,504, 20 of a 32-row tile;
        # or split into two int8 terms per group of K (below)
        x = torch.randn(20, 160) * 1e6
        # The terms keep 16 bits of each group: an entry 10^6 times the rest costs only its own
        # group (row 0, columns 64-127) its small entries, not the row's other groups
        outlier = x.clone()
        outlier[0, 100] *= 1e6
        terms, x_scale = split_terms(outlier, 64)
        restored = (terms[0].double() * 256 + terms[1].double()) * x_scale.double().repeat_interleave(64, 1)[:, :160]
        others = torch.ones_like(outlier, dtype=torch.bool)
        others[0, 64:128] = False
        errors["int8x2 terms of x, the other groups"] = rel(restored[others], outlier[others])
        expected = x.double() @ dequantize_weight(q, scale, torch.float64).T
        prescaled = Launch("tensor_cores", 32, 32, 256, convert="f16_bits")
        major = Launch("weight_major", 32, 64, 128, convert="f16_bits")
        # two 16-row tiles of a weight tile side by side (grid axis 0), the second partly rows
        rows_first = [Launch(kernel, 16, 64, 128, convert=convert, rows_first=True) for kernel in ("tensor_cores", "weight_major") for convert in ("bf16", "f16_bits")]
        two_terms = [Launch("tensor_cores", 32, 32, 128, convert="int8x2"), Launch("weight_major", 32, 64, 64, convert="int8x2"),
                     Launch("tensor_cores", 16, 64, 64, convert="int8x2", rows_first=True)]
        for split in (prescaled, replace(prescaled, split_k=2), major, *rows_first, replace(rows_first[1], split_k=2), *two_terms, replace(two_terms[0], split_k=2)):
            out = torch.empty(20, 96)
            split(x, q, scale, out)
            errors[f"int8 {split}"] = rel(out, expected)
        # Decode attention, whole and split over the keys (lengths 1-130: splits past a sequence's
        # keys, one partly filled BLOCK_L step); grouped-query heads
        k_cache, v_cache = torch.randn(5, 2, 160, 32), torch.randn(5, 2, 160, 32)
        q_rows = torch.randn(4, 6, 32)
        slots_, lengths_ = torch.tensor([3, 0, 4, 1]), torch.tensor([1, 64, 65, 130])
        cache = LayerCache(k_cache, v_cache)
        expected = sdpa_decode_attention(q_rows.double(), LayerCache(k_cache.double(), v_cache.double()), slots_, lengths_)
        for splits in (1, 4):
            errors[f"decode attention, {splits} splits"] = rel(decode_attention(q_rows, cache, slots_, lengths_, splits), expected)
        # over an int8 cache, against the reference's dequantized read of it
        (k8, k_scale), (v8, v_scale) = quantize(k_cache), quantize(v_cache)
        int8_cache = LayerCache(k8, v8, k_scale, v_scale)
        expected8 = sdpa_decode_attention(q_rows.double(), int8_cache, slots_, lengths_)
        for splits in (1, 4):
            errors[f"decode attention, int8 cache, {splits} splits"] = rel(decode_attention(q_rows, int8_cache, slots_, lengths_, splits), expected8)
        errors["decode attention, int8 cache, convert='f16' (q in fp16)"] = rel(decode_attention(q_rows.half(), int8_cache, slots_, lengths_, 4), expected8)
        # A captured prefill's prompt attention: three prompts in tiles of 64 rows (70 rows: a
        # partial second tile; 5; 20 rows after 60 keys already in the slot), then 6 padding rows
        # on a scratch slot; 3 query heads per KV head (not a power of two: masked query rows)
        lengths_, starts, slots_ = [70, 5, 20], [0, 0, 60], [3, 0, 1]
        q_rows = torch.randn(sum(lengths_) + 6, 6, 32)
        token_slots = torch.tensor([s for s, n in zip(slots_, lengths_) for _ in range(n)] + [4] * 6)
        cache_positions = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, lengths_)] + [torch.zeros(6, dtype=torch.long)])
        tiles = tile_table(slots_, lengths_, len(q_rows), 4, max_prompts=5)
        expected = sdpa_prompt_attention(q_rows.double(), LayerCache(k_cache.double(), v_cache.double()), token_slots, cache_positions, tiles)
        errors["prompt attention"] = rel(prompt_attention(q_rows, cache, token_slots, cache_positions, tiles), expected)
        expected8 = sdpa_prompt_attention(q_rows.double(), int8_cache, token_slots, cache_positions, tiles)
        errors["prompt attention, int8 cache"] = rel(prompt_attention(q_rows, int8_cache, token_slots, cache_positions, tiles), expected8)
        # in fp16 (the interpreter has no bf16), the 16-bit path's key step
        half = LayerCache(k_cache.half(), v_cache.half())
        errors["prompt attention, convert='f16' (q, k, v in fp16)"] = rel(prompt_attention(q_rows.half(), half, token_slots, cache_positions, tiles), expected)
        # the 16-bit path over an int8 cache: the integers widened to fp16, the softmax weights scaled in fp16
        errors["prompt attention, int8 cache, convert='f16' (q in fp16)"] = rel(prompt_attention(q_rows.half(), int8_cache, token_slots, cache_positions, tiles), expected8)
        # The tower's rotary embedding: 12 heads (not a power of two: masked head rows), head_dim 64;
        # cos/sin laid out as the tower's (two equal halves)
        qkv = torch.randn(50, 3, 12, 64)
        angles = torch.randn(50, 32)
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        fused_q, fused_k = vision_rope(qkv, cos, sin)
        ref_q, ref_k = rotate_qk(qkv, cos, sin)
        errors["vision rope"] = max(rel(fused_q, ref_q), rel(fused_k, ref_k))
    return errors


if __name__ == "__main__":
    print(json.dumps(_compare(Path(sys.argv[1]))))
