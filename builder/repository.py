"""Assemble a Triton model repository from a checkpoint: the build ``build-repo`` runs.

Output layout (every Python model carries its own copy of ``qwen3vl_runtime``, so the repository
can be mounted into NVIDIA's tritonserver container with only pip packages added):

  qwen3_vl/          ensemble: the one endpoint
  preprocess/1/      model.py, qwen3vl_runtime/, processor/ (tokenizer, chat template, image processor)
  vision_encoder/1/  model.onnx (+ model.py and qwen3vl_runtime/ with --vision-backend python);
                     none with --vision-backend decoder, where the decoder runs the tower itself
  language_model/1/  model.py, qwen3vl_runtime/, decoder/ (weights, config, tokenizer)
  manifest.json      source, versions, options, file sizes, parity and accuracy figures
  requirements.txt   what the Python models import
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import shutil
import tempfile
from pathlib import Path

import torch

from model_repository import RUNTIME_PACKAGE, SOURCE_DIR
from model_repository.qwen3vl_runtime import specs

from . import configs
from .checkpoint import checkpoint_fingerprint, resolve_checkpoint
from .options import BuildOptions, OptionError
from .progress import Progress

MANIFEST = "manifest.json"
# Files a checkpoint may hold for its tokenizer, chat template and processors (the ones present
# are copied).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
)
PROCESSOR_FILES = TOKENIZER_FILES + ("config.json", "preprocessor_config.json")
DECODER_EXTRA_FILES = TOKENIZER_FILES + ("generation_config.json",)
PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "tritonclient", "safetensors", "pillow", "numpy")
STEPS = 6
# Parity bound (max error over max magnitude) for int8 vision weights. Measured on the full-size
# tower with random weights: 2.3-2.7% (float32 export: 1.3e-6); a broken graph is off by 10-100%.
VISION_INT8_RTOL = 5e-2


def build_repository(options: BuildOptions, progress: Progress | None = None) -> dict:
    """Build the repository ``options`` describe; returns the manifest it wrote."""
    progress = progress or Progress(STEPS)
    final = Path(options.output)
    _check_output(final, options.force)
    # Built beside the target and moved into place at the end: a failed build leaves no
    # half-written repository behind.
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        manifest = _build(options, out, progress)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    return manifest


def _build(options: BuildOptions, out: Path, progress: Progress) -> dict:
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

    from .decoder_export import write_decoder
    from .quantize import accuracy_token_sequences
    from .vision_export import VisionParityError, check_vision_parity

    with progress.step(f"Opening checkpoint {options.model}"):
        checkpoint = resolve_checkpoint(options.model)
        source = checkpoint_fingerprint(checkpoint)
        config = json.loads((checkpoint / "config.json").read_text())
        text_hidden = config["text_config"]["hidden_size"]
        # float32 reference: the vision export and the decoder's accuracy are measured against it.
        hf = Qwen3VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
        progress.say(f"{sum(p.numel() for p in hf.parameters()):,} parameters from {checkpoint}")

    decoder_dir = out / specs.LANGUAGE_MODEL / "1" / "decoder"
    with progress.step(f"Writing the vision tower for {_VISION_PLACES[options.vision_backend]}"):
        encode = _write_vision(options, checkpoint, hf.model.visual, out, decoder_dir, progress)
    with progress.step("Checking the served vision encoder against PyTorch on random images"):
        image_processor = AutoImageProcessor.from_pretrained(checkpoint, backend="pil")
        try:
            vision_parity = check_vision_parity(
                hf.model.visual,
                encode,
                image_processor,
                rtol=VISION_INT8_RTOL if options.vision_int8 else 1e-3,
                progress=progress.say,
            )
        except VisionParityError as exc:
            rounded = options.vision_int8 or options.dtype != "float32"
            if options.vision_backend != "decoder" or not rounded:
                raise
            # Rounding alone puts a badly conditioned tower this far off (the tiny demo model's
            # random tower: 8-23% in bf16, 14-36% with int8 weights; the full-size random tower
            # with int8: 3%): say how to serve it unrounded.
            raise VisionParityError(
                f"{exc}. With --vision-backend decoder the tower's weights are written as "
                f"{'int8' if options.vision_int8 else options.dtype}; --dtype float32 --vision-weights float "
                "serves them unrounded"
            ) from None

    with progress.step("Reference logits of the unquantized decoder (transformers, float32)"):
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        sequences = accuracy_token_sequences(tokenizer)
        with torch.no_grad():
            reference = [hf(input_ids=torch.tensor([ids])).logits[0] for ids in sequences]
        del hf  # the largest object of the build; the decoder steps need the room

    with progress.step(f"Writing decoder weights (quant={options.quant}, dtype={options.dtype})"):
        write_decoder(checkpoint, decoder_dir, quantization=options.quant, dtype=options.dtype)
        _copy_present(checkpoint, decoder_dir, DECODER_EXTRA_FILES)
        accuracy = _decoder_accuracy(decoder_dir, sequences, reference, options.kv_cache_dtype)
        progress.say(
            "served decoder (KV cache {kv_cache_dtype}) vs transformers float32: top-1 agreement {top1_agreement:.4f}, "
            "mean logit cosine {mean_logit_cosine:.5f} over {positions} positions".format(kv_cache_dtype=options.kv_cache_dtype, **accuracy)
        )

    with progress.step("Writing configs and runtime code"):
        _write_models(out, options, checkpoint, text_hidden)
    manifest = {
        "format": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "versions": _versions(),
        "options": options.to_json(),
        "vision_weights": "int8" if options.vision_int8 else "float",
        "vision_parity": vision_parity,
        "decoder_accuracy": accuracy,
        "timings_s": progress.timings,
        "files": {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()},
    }
    manifest["total_bytes"] = sum(manifest["files"].values())
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


_VISION_PLACES = {
    "onnxruntime": "ONNX Runtime (ONNX export)",
    "python": "ONNX Runtime in a Python model (ONNX export)",
    "decoder": "the decoder's process (PyTorch weights)",
}


def _write_vision(options: BuildOptions, checkpoint: Path, visual, out: Path, decoder_dir: Path, progress: Progress):
    """Write the vision tower where ``--vision-backend`` serves it; returns that encoder, loaded
    back from what was written, for the parity check."""
    from .vision_export import export_vision_onnx, in_process_encoder, onnx_encoder

    if options.vision_backend == "decoder":
        from model_repository.qwen3vl_runtime.decoder_weights import load_vision_tower
        from model_repository.qwen3vl_runtime.patches import checkpoint_pixel_table

        from .decoder_export import write_vision

        # Int8 weights take the decoder's int8 kernels (fp8 builds too: the tower is compute-bound).
        write_vision(checkpoint, decoder_dir, quantization="int8" if options.vision_int8 else "none", dtype=options.dtype)
        # The decoder maps the images' bytes to floats with the checkpoint's image processor.
        _copy_present(checkpoint, decoder_dir, ("preprocessor_config.json",))
        # Checked in float32: the figure is the weights' error, not the CPU's bf16 rounding.
        return in_process_encoder(load_vision_tower(decoder_dir, "cpu", torch.float32), checkpoint_pixel_table(decoder_dir))
    onnx_path = out / specs.VISION / "1" / "model.onnx"
    if options.vision_int8:
        from .vision_quantize import quantize_vision_weights

        exported = export_vision_onnx(visual, out / "_export" / "model.onnx", progress=progress.say)
        counts = quantize_vision_weights(exported, onnx_path)
        shutil.rmtree(exported.parent)
        progress.say(
            f"int8 weights for {counts['quantized_matrices']} matrices: {counts['float_bytes'] / 1e6:.0f} MB -> {counts['int8_bytes'] / 1e6:.0f} MB"
        )
    else:
        export_vision_onnx(visual, onnx_path, progress=progress.say)
    return onnx_encoder(onnx_path)


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OptionError(f"--output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise OptionError(f"--output {out} exists and is not empty; pass --force to replace it")
        if not (out / MANIFEST).is_file():
            raise OptionError(
                f"--output {out} is not a repository built by build-repo (no {MANIFEST}); not deleting it"
            )
    out.parent.mkdir(parents=True, exist_ok=True)


def _decoder_accuracy(decoder_dir: Path, sequences: list[list[int]], reference: list[torch.Tensor], kv_cache: str) -> dict:
    """The served decoder (our runtime, quantized, in its dtype, over its KV cache: the dtype's or
    int8) against transformers' float32."""
    from model_repository.qwen3vl_runtime.decoder_weights import load_text_model
    from model_repository.qwen3vl_runtime.kv_cache import is_quantized

    from .quantize import measure_accuracy

    served = load_text_model(decoder_dir, "cpu")
    by_sequence = {tuple(ids): logits for ids, logits in zip(sequences, reference)}
    return measure_accuracy(
        lambda ids: by_sequence[tuple(ids[0].tolist())],
        lambda ids: served.sequence_logits(ids[0], is_quantized(kv_cache)),
        sequences,
    )


def _write_models(out: Path, options: BuildOptions, checkpoint: Path, text_hidden: int) -> None:
    python_models = [specs.PREPROCESS, specs.LANGUAGE_MODEL]
    if options.vision_backend == "python":
        python_models.append(specs.VISION)
    for name in python_models:
        version = out / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SOURCE_DIR / name / "1" / "model.py", version / "model.py")
        shutil.copytree(RUNTIME_PACKAGE, version / RUNTIME_PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    _copy_present(checkpoint, out / specs.PREPROCESS / "1" / "processor", PROCESSOR_FILES)
    (out / specs.ENSEMBLE / "1").mkdir(parents=True, exist_ok=True)
    write_configs(out, options, text_hidden)
    requirements = ["numpy<2", "torch", "transformers>=5.17", "tokenizers>=0.22", "safetensors", "pillow"]
    if options.vision_backend == "python":
        requirements.append("onnxruntime-gpu" if options.device == "cuda" else "onnxruntime")
    (out / "requirements.txt").write_text("\n".join(requirements) + "\n")


def write_configs(out: Path, options: BuildOptions, text_hidden: int) -> None:
    """The config.pbtxt files. Each is replaced, not overwritten in place: in a repository
    copied with hard links (configure-repo --output) the source keeps its own configs."""
    models = [
        configs.ensemble_config(options),
        configs.preprocess_config(options),
        configs.language_model_config(options, text_hidden),
    ]
    if options.vision_backend != "decoder":
        models.append(configs.vision_config(options, text_hidden))
    for config in models:
        replace_file(out / config.name / "config.pbtxt", configs.to_pbtxt(config))


def replace_file(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    path.write_text(text)


def _copy_present(src: Path, dest: Path, names: tuple[str, ...]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)


def _versions() -> dict:
    versions = {}
    for package in ("qwen3vl-triton",) + PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions
