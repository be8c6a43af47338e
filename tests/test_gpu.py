"""The decoder's GPU path: kernels against the PyTorch reference, CUDA-graph decoding against
transformers, and batching that does not change answers. Skipped without CUDA."""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def layer_cache(k: torch.Tensor, v: torch.Tensor, quantized: bool):
    """(the cache the kernel reads, the reference's float64 view of the same values)."""
    from model_repository.qwen3vl_runtime.kv_cache import LayerCache, quantize

    if not quantized:
        return LayerCache(k, v), LayerCache(k.double(), v.double())
    (k8, k_scale), (v8, v_scale) = quantize(k), quantize(v)
    cache = LayerCache(k8, v8, k_scale, v_scale)
    return cache, LayerCache(*cache.read((slice(None),), torch.float64))


@pytest.mark.parametrize("quantized", [False, True], ids=["model-dtype-cache", "int8-cache"])
@pytest.mark.parametrize("splits", [1, None])  # None: as many key ranges as this GPU's SMs want (8 here)
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_decode_attention_kernel_matches_sdpa(dtype, bound, splits, quantized):
    from model_repository.qwen3vl_runtime.kernels.decode_attention import decode_attention
    from model_repository.qwen3vl_runtime.text_model import sdpa_decode_attention

    torch.manual_seed(0)
    k = torch.randn(9, 8, 700, 128, device="cuda", dtype=dtype)
    cache, reference = layer_cache(k, torch.randn_like(k), quantized)
    q = torch.randn(6, 16, 128, device="cuda", dtype=dtype)
    slots = torch.tensor([8, 0, 3, 5, 1, 2], device="cuda")
    lengths = torch.tensor([1, 63, 64, 65, 300, 700], device="cuda")
    out = decode_attention(q, cache, slots, lengths, splits)
    assert rel_error(out, sdpa_decode_attention(q.double(), reference, slots, lengths)) < bound


@pytest.mark.parametrize("quantized", [False, True], ids=["model-dtype-cache", "int8-cache"])
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_prompt_attention_kernel_matches_sdpa(dtype, bound, quantized):
    """The real model's heads (16 over 8 KV heads, head_dim 128): prompts of 1, 64, 65 and 300
    rows (the last after 100 keys already in its slot), then 7 padding rows on a scratch slot."""
    from model_repository.qwen3vl_runtime.kernels.prompt_attention import prompt_attention, tile_table
    from model_repository.qwen3vl_runtime.text_model import sdpa_prompt_attention

    torch.manual_seed(0)
    k = torch.randn(6, 8, 512, 128, device="cuda", dtype=dtype)
    cache, reference = layer_cache(k, torch.randn_like(k), quantized)
    slots, lengths, starts = [4, 0, 2, 1], [1, 64, 65, 300], [0, 0, 0, 100]
    token_slots = torch.tensor([s for s, n in zip(slots, lengths) for _ in range(n)] + [5] * 7, device="cuda")
    cache_positions = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, lengths)] + [torch.zeros(7, dtype=torch.long)]).cuda()
    q = torch.randn(len(token_slots), 16, 128, device="cuda", dtype=dtype)
    tiles = tile_table(slots, lengths, len(q), 5, max_prompts=16).cuda()
    out = prompt_attention(q, cache, token_slots, cache_positions, tiles)
    assert rel_error(out, sdpa_prompt_attention(q.double(), reference, token_slots, cache_positions, tiles)) < bound


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)])
def test_vision_rope_kernel_matches_transformers(dtype, bound):
    """The tower's q/k rotary kernel against transformers' float32 function, on the real shape
    (16 heads of 64) and the tower's cos/sin layout; bf16: both round once from float32 to
    nearest, so they differ only where the kernel's fused multiply-adds land on the other side of
    a rounding. (Triton's CPU interpreter truncates that cast instead, which this bound refuses.)"""
    from model_repository.qwen3vl_runtime.kernels.vision_rope import vision_rope
    from model_repository.qwen3vl_runtime.vision_tower import rotate_qk

    torch.manual_seed(0)
    qkv = torch.randn(784 * 3, 3 * 16 * 64, device="cuda", dtype=dtype).view(-1, 3, 16, 64)
    angles = torch.randn(qkv.shape[0], 32, device="cuda") * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    for fused, reference in zip(vision_rope(qkv, cos, sin), rotate_qk(qkv, cos, sin)):
        assert fused.dtype == reference.dtype and rel_error(fused, reference) < bound


@pytest.mark.parametrize("mode, bound", [("int8", 1e-2), ("fp8", 6e-2)])
@pytest.mark.parametrize("m", [1, 7, 33, 64, 200, 2000])  # decode tiles up to 64 rows, prefill tiles above
def test_8bit_matmul_kernels_match_the_reference(mode, bound, m):
    from model_repository.qwen3vl_runtime.gpu import _fast_matmul
    from model_repository.qwen3vl_runtime.quant import dequantize_weight, quantize_weight

    torch.manual_seed(m)
    weight = torch.randn(4096, 2048, device="cuda")
    q, scale = quantize_weight(weight, mode)
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    reference = x.double() @ dequantize_weight(q, scale, torch.float64).T
    assert rel_error(_fast_matmul(q.dtype)(x, q, scale), reference) < bound


@pytest.mark.parametrize("m", [200, 2000])
def test_int8_prefill_launches_match_the_reference_and_are_tuned_only_at_start_up(m, tmp_path, monkeypatch):
    """Every launch the tuner may pick for a prefill-sized int8 product; outside ``tuning_prefills``
    such a key is not tuned (it dequantizes), inside it is, every candidate timed."""
    from model_repository.qwen3vl_runtime.kernels import int8_matmul, tuning_cache
    from model_repository.qwen3vl_runtime.quant import dequantize_weight, quantize_weight

    torch.manual_seed(m)
    q, scale = quantize_weight(torch.randn(4096, 2048, device="cuda"), "int8")
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(4096, device="cuda")
    reference = x.double() @ dequantize_weight(q, scale, torch.float64).T
    launches = int8_matmul.prefill_candidates(torch.int8, q.numel())
    for launch in launches:
        out = torch.empty(m, 4096, device="cuda", dtype=torch.bfloat16)
        launch(x, q, scale, out)
        assert rel_error(out, reference) < 1e-2, launch.label
    monkeypatch.setenv(tuning_cache.ENV, str(tmp_path / "tuning.json"))
    monkeypatch.setattr(int8_matmul, "TUNED", {})
    key = (int8_matmul.rows_bucket(m), 4096, 2048, torch.int8, torch.bfloat16)
    assert rel_error(int8_matmul.int8_matmul(x, q, scale), reference) < 1e-2
    assert key not in int8_matmul.TUNED
    with int8_matmul.tuning_prefills():
        out = int8_matmul.int8_matmul(x, q, scale, bias)
    assert len([ms for _, ms, _ in int8_matmul.TUNED[key].timings if ms is not None]) == len(launches)
    assert rel_error(out, reference + bias.double()) < 1e-2


@pytest.fixture(scope="module")
def gpu_parts(tiny_checkpoint, tmp_path_factory):
    from transformers import AutoTokenizer

    from builder.decoder_export import write_decoder
    from model_repository.qwen3vl_runtime.decoder_weights import load_text_model

    folder = tmp_path_factory.mktemp("decoder")
    write_decoder(tiny_checkpoint, folder, quantization="none", dtype="float32")
    return load_text_model(folder, "cuda"), AutoTokenizer.from_pretrained(tiny_checkpoint)


def text_prompt(ids: list[int]):
    from model_repository.qwen3vl_runtime.engine.runner import PromptInputs

    ids = torch.tensor(ids)
    return PromptInputs(ids, torch.arange(len(ids)).expand(3, -1))


def run_engine(parts, prompts, *, slots, max_tokens=16, runner=None, gap_s=0.0, prefills_beside=None):
    """Each prompt's greedy tokens from an engine over ``runner`` (default: a new one of ``slots``);
    prompts submitted ``gap_s`` apart; with ``prefills_beside`` (a list) the engine prefills beside
    its decode steps (``prefill_stream``), the list getting one item per such prefill."""
    from model_repository.qwen3vl_runtime.engine import Engine, SamplingParams, Sequence
    from model_repository.qwen3vl_runtime.engine.runner import ModelRunner

    model, tokenizer = parts
    runner = runner or ModelRunner(model, num_slots=slots, max_len=256, image_token_id=151655)
    engine = Engine(runner, tokenizer, eos_token_ids={151645}, num_slots=slots, overlap_prefill=prefills_beside is not None)
    if prefills_beside is not None:
        prefilling = engine.streams.prefilling
        engine.streams.prefilling = lambda: prefills_beside.append(1) or prefilling()
    engine.start()
    outputs = {i: [] for i in range(len(prompts))}
    finished, done = set(), threading.Event()

    def emit(i, out):
        outputs[i].extend(out.token_ids)
        if out.finish_reason or out.error:
            assert out.error is None, out.error
            finished.add(i)
            if len(finished) == len(prompts):
                done.set()

    try:
        for i, ids in enumerate(prompts):
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            engine.submit(Sequence(str(i), text_prompt(ids), len(ids), 0, params, lambda out, i=i: emit(i, out)))
            time.sleep(gap_s)
        assert done.wait(120)
    finally:
        engine.stop()
    return [outputs[i] for i in range(len(prompts))]


def test_graphs_are_captured_beside_a_running_engine(gpu_parts):
    """A second runner (graphed decode and prefill) captures its graphs while another engine's
    thread keeps decoding, then answers as a lone engine does. Under CUDA's global capture mode
    the running engine's event waits could invalidate such a capture (seen once in this file)."""
    from model_repository.qwen3vl_runtime.engine import Engine, SamplingParams, Sequence
    from model_repository.qwen3vl_runtime.engine.runner import ModelRunner

    model, tokenizer = gpu_parts
    prompt = [151644, 872, 198, 300, 301, 302, 151645, 198]
    busy = Engine(ModelRunner(model, num_slots=2, max_len=256, image_token_id=151655), tokenizer, eos_token_ids={151645}, num_slots=2)
    stop, responses = threading.Event(), []

    def submit():
        busy.submit(Sequence("busy", text_prompt(prompt), len(prompt), 0, SamplingParams(max_tokens=64, ignore_eos=True), emit))

    def emit(out):  # a closed loop: the busy engine decodes until told to stop
        responses.append(out)
        if out.finish_reason and not stop.is_set():
            submit()

    busy.start()
    try:
        submit()
        while not responses:
            time.sleep(0.01)
        before = len(responses)
        captured = ModelRunner(model, num_slots=4, max_len=256, image_token_id=151655, graphed_prefill=True)
        assert len(responses) > before  # the busy engine decoded while the graphs were captured
        assert all(out.error is None for out in responses)
    finally:
        stop.set()
        busy.stop()
    # The graphs captured beside the busy engine answer as graphs captured alone do (both graphed,
    # so no eager-vs-graphed rounding enters the comparison).
    alone = ModelRunner(model, num_slots=4, max_len=256, image_token_id=151655, graphed_prefill=True)
    prompts = [prompt, prompt[:5]]
    assert run_engine(gpu_parts, prompts, slots=4, max_tokens=24, runner=captured) == run_engine(gpu_parts, prompts, slots=4, max_tokens=24, runner=alone)


def test_graphed_float32_decoding_matches_transformers(gpu_parts, tiny_checkpoint):
    from transformers import Qwen3VLForConditionalGeneration

    hf = Qwen3VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).cuda().eval()
    prompts = [[151644, 872, 198, 100 + 7 * i, 2000 + i, 151645, 198, 151644, 77091, 198] for i in range(3)]
    ours = run_engine(gpu_parts, prompts, slots=4)
    for prompt, tokens in zip(prompts, ours):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert tokens == out[0, len(prompt) :].tolist()


def test_64_streams_answer_as_each_alone(gpu_parts):
    """float32, greedy: the batch a request is decoded in must not change its tokens."""
    prompts = [[151644, 872, 198] + [100 + (i * 37 + j * 11) % 5000 for j in range(3 + i % 17)] + [151645, 198] for i in range(64)]
    together = run_engine(gpu_parts, prompts, slots=64, max_tokens=24)
    for i in range(0, 64, 9):
        assert run_engine(gpu_parts, [prompts[i]], slots=1, max_tokens=24)[0] == together[i], i


def test_prefills_beside_decoding_answer_as_each_alone(gpu_parts):
    """float32, greedy, prompts arriving while others decode: their prefills (graphed, on the
    prefill stream) run beside the decode steps, and no stream's tokens change."""
    from model_repository.qwen3vl_runtime.engine.runner import ModelRunner

    prompts = [[151644, 872, 198] + [100 + (i * 53 + j * 7) % 5000 for j in range(5 + i % 23)] + [151645, 198] for i in range(24)]
    runner = ModelRunner(gpu_parts[0], num_slots=24, max_len=256, image_token_id=151655, graphed_prefill=True)
    beside = []
    together = run_engine(gpu_parts, prompts, slots=24, max_tokens=48, runner=runner, gap_s=0.004, prefills_beside=beside)
    assert len(beside) >= 3, beside
    for i in range(0, 24, 5):
        assert run_engine(gpu_parts, [prompts[i]], slots=1, max_tokens=48)[0] == together[i], i


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_forward_matches_the_reference_model(gpu_parts, dtype, bound):
    from model_repository.qwen3vl_runtime.fused_forward import fused_decode, fused_prefill
    from model_repository.qwen3vl_runtime.kernels.decode_attention import decode_attention

    model = gpu_parts[0].to(dtype)
    try:
        torch.manual_seed(0)
        n = 40
        ids = torch.randint(100, 5000, (n,), device="cuda")
        positions = torch.arange(n, device="cuda").expand(3, -1).clone()
        positions[1:, 10:14] += 1
        visual = torch.zeros(n, dtype=torch.bool, device="cuda")
        visual[10:14] = True
        deepstack = torch.randn(3, 4, model.config.hidden_size, device="cuda", dtype=dtype)
        kv_ref, kv_fused = model.new_cache(3, 128), model.new_cache(3, 128)
        ref = model.prefill(model.embed(ids), positions, kv_ref, 1, visual_mask=visual, deepstack=deepstack)
        fused = fused_prefill(model, kv_fused, model.embed(ids), positions, [1], [n], visual.nonzero().flatten(), deepstack)[0]
        assert rel_error(fused, ref) < bound
        model.decode_attention = decode_attention
        step = [torch.tensor(t, device="cuda") for t in ([int(ref.argmax())], [n], [1], [n])]
        assert rel_error(fused_decode(model, *step[:2], kv_fused, *step[2:]), model.decode(*step[:2], kv_ref, *step[2:])) < bound
    finally:
        model.to(torch.float32)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_int8_cache_fused_forward_matches_the_reference_model(gpu_parts, dtype, bound):
    """Over an int8 cache (kv_cache.py): the GPU kernel stores the integers and scales the
    reference model's quantize stores (the same but where the two paths' unrounded keys straddle a
    rounding boundary: in float32 ~1e-7 apart), and the fused prefill's and decode step's logits
    match the reference model's over its own int8 cache."""
    from model_repository.qwen3vl_runtime.fused_forward import fused_decode, fused_prefill
    from model_repository.qwen3vl_runtime.kernels.decode_attention import decode_attention

    model = gpu_parts[0].to(dtype)
    try:
        torch.manual_seed(3)
        n = 60
        ids = torch.randint(100, 5000, (n,), device="cuda")
        positions = torch.arange(n, device="cuda").expand(3, -1)
        kv_ref, kv_fused = model.new_cache(3, 128, quantized=True), model.new_cache(3, 128, quantized=True)
        ref = model.prefill(model.embed(ids), positions, kv_ref, 2)
        fused = fused_prefill(model, kv_fused, model.embed(ids), positions, [2], [n])[0]
        assert rel_error(fused, ref) < bound
        for layer_ref, layer_fused in zip(kv_ref, kv_fused):
            for name in ("k", "v"):
                a, b = getattr(layer_fused, name)[2, :, :n], getattr(layer_ref, name)[2, :, :n]
                assert a.dtype == torch.int8
                same = (a == b).float().mean().item()
                assert same > (0.999 if dtype == torch.float32 else 0.98), (name, same)
                assert rel_error(getattr(layer_fused, f"{name}_scale")[2, :, :n], getattr(layer_ref, f"{name}_scale")[2, :, :n]) < bound
        model.decode_attention = decode_attention
        step = [torch.tensor(t, device="cuda") for t in ([int(ref.argmax())], [n], [2], [n])]
        assert rel_error(fused_decode(model, *step[:2], kv_fused, *step[2:]), model.decode(*step[:2], kv_ref, *step[2:])) < bound
    finally:
        model.to(torch.float32)


def test_64_streams_over_an_int8_cache_answer_as_each_alone(gpu_parts):
    """float32, greedy, the KV cache in int8: batching still changes no stream's tokens."""
    from model_repository.qwen3vl_runtime.engine.runner import ModelRunner

    prompts = [[151644, 872, 198] + [100 + (i * 41 + j * 13) % 5000 for j in range(3 + i % 17)] + [151645, 198] for i in range(64)]
    int8_runner = lambda slots: ModelRunner(gpu_parts[0], num_slots=slots, max_len=256, image_token_id=151655, quantized_kv=True)  # noqa: E731
    together = run_engine(gpu_parts, prompts, slots=64, max_tokens=24, runner=int8_runner(64))
    for i in range(0, 64, 9):
        assert run_engine(gpu_parts, [prompts[i]], slots=1, max_tokens=24, runner=int8_runner(1))[0] == together[i], i


def test_batched_prefill_equals_one_by_one(gpu_parts):
    """Prompts prefilled together (concatenated) give each one's own logits and cache."""
    from model_repository.qwen3vl_runtime.fused_forward import fused_prefill

    model = gpu_parts[0]
    torch.manual_seed(1)
    lengths = [7, 30, 12]
    ids = [torch.randint(100, 5000, (n,), device="cuda") for n in lengths]
    positions = [torch.arange(n, device="cuda").expand(3, -1) for n in lengths]
    kv_batch, kv_single = model.new_cache(4, 64), model.new_cache(4, 64)
    batched = fused_prefill(model, kv_batch, model.embed(torch.cat(ids)), torch.cat(positions, 1), [3, 0, 2], lengths)
    for row, (slot, i, p) in enumerate(zip([3, 0, 2], ids, positions)):
        single = fused_prefill(model, kv_single, model.embed(i), p, [slot], [len(i)])[0]
        assert rel_error(batched[row], single) < 1e-5
        assert rel_error(kv_batch[1].k[slot, :, : len(i)], kv_single[1].k[slot, :, : len(i)]) < 1e-5


@pytest.mark.parametrize("quantized", [False, True], ids=["model-dtype-cache", "int8-cache"])
@pytest.mark.parametrize("lengths", [[9, 40], [9, 40, 300, 200, 120]])
def test_graphed_prefill_equals_eager_prefill(gpu_parts, lengths, quantized):
    """Prompts, the first with image rows and deepstack features, through the captured graphs:
    two in the 64-token bucket, five (669 tokens) in the 768 one, then the last three of those
    five again (620 tokens, the same bucket). Over an int8 cache the eager prefill attends over the
    keys it kept, dequantized as the cache holds them, and the graphs over the cache itself."""
    from model_repository.qwen3vl_runtime.engine.cuda_graphs import GraphedPrefill
    from model_repository.qwen3vl_runtime.fused_forward import fused_prefill
    from model_repository.qwen3vl_runtime.gpu import use_gpu_kernels

    model = use_gpu_kernels(gpu_parts[0])  # the graphs need the prompt attention's kernel
    torch.manual_seed(2)
    slots = [1, 3, 0, 2, 5][: len(lengths)]
    tokens = sum(lengths)
    embeds = model.embed(torch.randint(100, 5000, (tokens,), device="cuda"))
    positions = torch.cat([torch.arange(n, device="cuda").expand(3, -1) for n in lengths], 1).clone()
    visual = torch.zeros(tokens, dtype=torch.bool, device="cuda")
    visual[15:19] = True
    deepstack = torch.randn(3, 4, model.config.hidden_size, device="cuda")
    kv_eager, kv_graph = model.new_cache(7, 512, quantized=quantized), model.new_cache(7, 512, quantized=quantized)
    rows = visual.nonzero().flatten()
    eager = fused_prefill(model, kv_eager, embeds, positions, slots, lengths, rows, deepstack)
    graphs = GraphedPrefill(model, kv_graph, scratch_slot=6)
    assert graphs.fits(lengths, len(rows)) and not graphs.fits([513], 0)
    graphed = graphs(embeds, positions, slots, lengths, rows, deepstack)
    assert rel_error(graphed, eager) < 1e-5
    for slot, n in zip(slots, lengths):
        assert rel_error(kv_graph[0].v[slot, :, :n], kv_eager[0].v[slot, :, :n]) < 1e-5
    if len(lengths) > 2:  # the same bucket again with fewer prompts and no image: none of the
        # first call's attention tiles may be left in the graph's table
        first = sum(lengths[:2])
        again = graphs(embeds[first:], positions[:, first:], slots[2:], lengths[2:], rows[:0], None)
        assert rel_error(again, fused_prefill(model, kv_eager, embeds[first:], positions[:, first:], slots[2:], lengths[2:])) < 1e-5


@pytest.fixture(scope="module")
def well_conditioned_checkpoint(tmp_path_factory):
    """A tiny checkpoint whose vision tower has the real initializer_range (0.02): the tiny
    default (0.5) amplifies bf16 rounding alone to a 16% error, hiding what is measured here."""
    from transformers import Qwen3VLForConditionalGeneration

    from builder.checkpoint import demo_config

    config = demo_config()
    config.vision_config.initializer_range = 0.02
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("well-conditioned")
    Qwen3VLForConditionalGeneration._from_config(config).save_pretrained(path)
    return path


# Measured on the CPU for this tower: bf16 0.7%, bf16 with int8 weights 1.2% from float32.
@pytest.mark.parametrize("dtype, quantization, bound", [("float32", "none", 1e-4), ("bfloat16", "int8", 3e-2)])
def test_vision_in_decoder_matches_transformers(well_conditioned_checkpoint, tiny_checkpoint, tmp_path, dtype, quantization, bound):
    """The tower as the decoder runs it on the GPU (--vision-backend decoder): three images of two
    sizes in one call against transformers' float32 tower on the CPU (cuDNN's Conv3d would use
    TF32 on the GPU) on the same images."""
    from io import BytesIO

    from PIL import Image
    from transformers import AutoImageProcessor, Qwen3VLForConditionalGeneration

    from builder.decoder_export import write_vision
    from model_repository.qwen3vl_runtime.decoder_weights import load_vision_tower
    from model_repository.qwen3vl_runtime.engine.vision import ImageEncoder, ImageInputs
    from model_repository.qwen3vl_runtime.gpu import use_gpu_kernels
    from model_repository.qwen3vl_runtime.patches import PatchMaker, pixel_table
    from model_repository.qwen3vl_runtime.vision_inputs import vision_position_inputs
    from tests.conftest import png

    write_vision(well_conditioned_checkpoint, tmp_path, quantization=quantization, dtype=dtype)
    processor = AutoImageProcessor.from_pretrained(tiny_checkpoint, backend="pil")
    encoder = ImageEncoder(use_gpu_kernels(load_vision_tower(tmp_path, "cuda")), pixel_table(processor))
    encoder.warm_up()
    size = processor.size
    patches = PatchMaker(processor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    sizes = [(448, 448), (320, 224), (448, 448)]
    images = [Image.open(BytesIO(png(w, h, seed=i))).convert("RGB") for i, (w, h) in enumerate(sizes)]
    requests = []
    for image in images:  # the bytes the preprocess model sends; the floats made on the GPU
        patch_bytes, grid = patches.make([image])
        arrays = vision_position_inputs(grid, num_grid_per_side=encoder.visual.num_grid_per_side, spatial_merge_size=2)
        requests.append(ImageInputs.from_arrays({**arrays, "pixel_bytes": patch_bytes}))
    embeds, deepstack = encoder(requests)
    hf = Qwen3VLForConditionalGeneration.from_pretrained(well_conditioned_checkpoint, dtype=torch.float32).model.visual.eval()
    batch = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        reference = hf(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    assert rel_error(embeds.cpu(), reference.pooler_output) < bound
    assert rel_error(deepstack.cpu(), torch.stack(list(reference.deepstack_features))) < bound


def test_graphed_vision_tower_equals_eager(well_conditioned_checkpoint, tiny_checkpoint, tmp_path):
    """The tower replayed from CUDA graphs (the engine's default) against the same tower run
    eagerly, float32: two calls with different images, so that a graph replaying stale static
    inputs (an earlier call's patches) fails, and sizes that need a padded bucket (three of one
    size: a bucket of 4) and two graphs in one call. One size's graphs were captured at start."""
    import numpy as np

    from builder.decoder_export import write_vision
    from model_repository.qwen3vl_runtime.decoder_weights import load_vision_tower
    from model_repository.qwen3vl_runtime.engine.vision import ImageEncoder, ImageInputs
    from model_repository.qwen3vl_runtime.gpu import use_gpu_kernels
    from model_repository.qwen3vl_runtime.patches import checkpoint_pixel_table
    from model_repository.qwen3vl_runtime.vision_inputs import vision_position_inputs

    write_vision(well_conditioned_checkpoint, tmp_path, quantization="none", dtype="float32")
    # 28x28 patches (a 448 px image) prepared at start, as build-repo --vision-graph-sizes 448x448 does
    encoder = ImageEncoder(use_gpu_kernels(load_vision_tower(tmp_path, "cuda")), checkpoint_pixel_table(tiny_checkpoint), graph_grids=((1, 28, 28),))
    assert encoder.warm_up() == {(1, 28, 28): [1, 2, 4, 8]}  # 16 x 784 patches is over MAX_PATCHES
    visual = encoder.visual

    def images(grids, seed):
        rng = np.random.default_rng(seed)
        out = []
        for grid in grids:
            arrays = vision_position_inputs(np.array([grid]), num_grid_per_side=visual.num_grid_per_side, spatial_merge_size=2)
            arrays["pixel_bytes"] = rng.integers(0, 256, (int(np.prod(grid)), encoder.patch_width), dtype=np.uint8)
            out.append(ImageInputs.from_arrays(arrays))
        return out

    for seed, grids in enumerate([[(1, 28, 28), (1, 14, 20), (1, 28, 28), (1, 28, 28)], [(1, 28, 28), (1, 14, 20)]]):
        batch = images(grids, seed)
        graphed, eager = encoder(batch), encoder.encode_eager(batch)
        for g, e in zip(graphed, eager):
            assert g.shape == e.shape
            assert rel_error(g, e) < 1e-5
    assert len(encoder.graphs.graphs) >= 2  # the calls above replayed graphs, not the eager fallback
    # only the 14x20 size was captured while serving (buckets of 1), the 28x28 ones were prepared
    assert encoder.captures.count == 1 and encoder.captures.seconds > 0


def test_batched_sampler_on_the_gpu_keeps_transformers_filter_and_its_seeds():
    """The sampler's CUDA path (host generators, queued copies, one sort for all rows)."""
    from model_repository.qwen3vl_runtime.engine.sampler import filter_logits, sample
    from tests.test_sampler import ROWS, bf16_logits, transformers_filtered

    logits = bf16_logits(len(ROWS))
    on_gpu = filter_logits(logits.cuda(), ROWS).cpu()
    for row, params in enumerate(ROWS):
        expected = transformers_filtered(logits[row], params)
        assert torch.equal(torch.isfinite(on_gpu[row]), torch.isfinite(expected)), row
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(len(ROWS))]  # noqa: E731
    first, again = sample(logits.cuda(), ROWS, generators()), sample(logits.cuda(), ROWS, generators())
    assert first.is_cuda and torch.equal(first, again)
    assert all(torch.isfinite(transformers_filtered(logits[r], p)[first[r].item()]) for r, p in enumerate(ROWS))


def test_graphed_sampler_replays_what_the_batched_sampler_draws():
    """engine/cuda_graphs.GraphedSampler: three steps of five rows (bucket 8; greedy and sampled
    rows, the generation config's default among them) give the eager sampler's tokens, each row's
    generator advancing the same way. float32 logits: no ties to order differently."""
    from model_repository.qwen3vl_runtime.engine import SamplingParams
    from model_repository.qwen3vl_runtime.engine.cuda_graphs import GraphedSampler
    from model_repository.qwen3vl_runtime.engine.sampler import sample
    from tests.test_sampler import ROWS

    vocab = 151936
    buffers = {b: torch.zeros(b, vocab, device="cuda") for b in (1, 4, 8, 16)}
    sampler = GraphedSampler(buffers)
    assert sorted(sampler.graphs) == [1, 4, 8]  # above GRAPH_MAX_ROWS the eager sampler measured faster
    params = [ROWS[0], SamplingParams(), ROWS[2], ROWS[0], SamplingParams(temperature=0.9)]
    graph_gens, eager_gens = ([None if p.greedy else torch.Generator().manual_seed(i) for i, p in enumerate(params)] for _ in range(2))
    for step in range(3):
        buffers[8].copy_(torch.randn(8, vocab, generator=torch.Generator().manual_seed(step)).mul(3))
        graphed = sampler(8, params, graph_gens).clone()
        assert torch.equal(graphed, sample(buffers[8][: len(params)], params, eager_gens)), step


def test_decode_tuning_is_kept_for_the_next_start(tmp_path, monkeypatch):
    """kernels/tuning_cache.py: a second start takes the first one's pick, checked, not re-timed."""
    from model_repository.qwen3vl_runtime.kernels import int8_matmul, tuning_cache
    from model_repository.qwen3vl_runtime.quant import quantize_weight

    monkeypatch.setenv(tuning_cache.ENV, str(tmp_path / "tuning.json"))
    q, scale = quantize_weight(torch.randn(512, 256, device="cuda"), "int8")
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    key = (4, 512, 256, torch.int8, torch.bfloat16)
    monkeypatch.setattr(int8_matmul, "TUNED", {})
    first = int8_matmul.launch_for(x, q, scale)
    assert len(int8_matmul.TUNED[key].timings) > 1  # timed
    monkeypatch.setattr(int8_matmul, "TUNED", {})  # a new process
    assert int8_matmul.launch_for(x, q, scale) == first
    assert int8_matmul.TUNED[key].timings == [(first, None, "from the tuning cache")]
