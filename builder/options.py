"""Build options: one frozen dataclass that validates itself; the CLI takes its defaults from here."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from model_repository.qwen3vl_runtime.kv_cache import KV_CACHE_DTYPES
from model_repository.qwen3vl_runtime.patches import parse_image_sizes
from model_repository.qwen3vl_runtime.tiers import DEFAULT_TIERS, TierTable

QUANT_MODES = ("none", "int8", "fp8")
DTYPES = ("bfloat16", "float16", "float32")
VISION_BACKENDS = ("onnxruntime", "python", "decoder")
VISION_WEIGHTS = ("auto", "float", "int8")
DEVICES = ("cuda", "cpu")


class OptionError(ValueError):
    """An option value that cannot work; the message names the option."""


@dataclass(frozen=True)
class BuildOptions:
    """Everything ``build-repo`` needs; field docs become the CLI help."""

    model: str = field(metadata={"help": "checkpoint directory, or a hub id already in the local HF cache"})
    output: Path = field(metadata={"help": "where the Triton model repository is written"})
    quant: str = field(default="none", metadata={"help": "decoder weights: none (model dtype), int8 or fp8 (e4m3)"})
    dtype: str = field(default="bfloat16", metadata={"help": "decoder compute dtype"})
    device: str = field(default="cuda", metadata={"help": "where the decoder and vision models run"})
    gpus: tuple[int, ...] = field(default=(0,), metadata={"help": "GPU ids (comma separated) for --device cuda"})
    vision_backend: str = field(
        default="onnxruntime",
        metadata={
            "help": "onnxruntime: Triton's ORT backend (NVIDIA's container); python: ORT in a Python model; "
            "decoder: the decoder's process runs the tower (PyTorch), batching images across requests, "
            "one CUDA context fewer"
        },
    )
    vision_weights: str = field(
        default="auto",
        metadata={"help": "vision weights: float, or int8 (ONNX: dequantized in the graph; decoder: int8 kernels); auto = int8 with --quant"},
    )
    max_context: int = field(default=4096, metadata={"help": "tokens per sequence, prompt + answer"})
    kv_cache_slots: int = field(
        default=16, metadata={"help": "sequences decoded together; KV cache = slots x max_context tokens"}
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata={"help": "KV cache elements: auto (the --dtype) or int8 (a scale per token and head: 52%% of bf16's bytes; its accuracy is measured into the manifest)"},
    )
    default_max_tokens: int = field(default=512, metadata={"help": "answer length when a request sets none"})
    max_pixels: int = field(
        default=1024 * 1024, metadata={"help": "images above this are resized down (1 token per 32x32 px)"}
    )
    min_pixels: int = field(default=64 * 1024, metadata={"help": "images below this are resized up"})
    max_images: int = field(default=4, metadata={"help": "images per request"})
    max_source_pixels: int = field(
        default=64_000_000, metadata={"help": "encoded images above this are rejected (decompression bombs)"}
    )
    preprocess_instances: int = field(default=2, metadata={"help": "CPU instances of the preprocess model"})
    vision_instances: int = field(default=1, metadata={"help": "vision encoder instances per GPU"})
    graphed_prefill: bool = field(
        default=False,
        metadata={"help": "replay short prompts' prefill from CUDA graphs: a faster first token, more GPU memory"},
    )
    vision_graph_sizes: str = field(
        default="",
        metadata={
            "help": "with --vision-backend decoder on a GPU: image sizes (WxH pixels, comma separated, as clients send them) "
            "whose CUDA graphs the vision tower captures at start, for every images-per-call bucket; any other size "
            "is captured on first sight, stalling every stream meanwhile (77-79 ms per bucket on an H200, docs/benchmarks.md run 20)"
        },
    )
    prefill_hold_ms: float = field(
        default=20.0,
        metadata={"help": "while 16+ streams decode, newcomers wait up to this long for more to share their prefill (0: never)"},
    )
    tiers: Path | None = field(
        default=None,
        metadata={"help": "JSON file of service tiers (priority, concurrency, queue timeout, ...); default: vip/standard/free"},
    )
    force: bool = field(default=False, metadata={"help": "replace an existing output directory"})

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise OptionError(message)

        check(self.quant in QUANT_MODES, f"--quant must be one of {', '.join(QUANT_MODES)}, got {self.quant!r}")
        check(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(self.kv_cache_dtype in KV_CACHE_DTYPES, f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        check(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        check(
            self.vision_backend in VISION_BACKENDS,
            f"--vision-backend must be one of {', '.join(VISION_BACKENDS)}, got {self.vision_backend!r}",
        )
        check(
            self.vision_weights in VISION_WEIGHTS,
            f"--vision-weights must be one of {', '.join(VISION_WEIGHTS)}, got {self.vision_weights!r}",
        )
        check(self.device == "cpu" or len(self.gpus) > 0, "--gpus needs at least one id with --device cuda")
        check(all(g >= 0 for g in self.gpus) and len(set(self.gpus)) == len(self.gpus), f"--gpus: bad ids {self.gpus}")
        check(self.max_context >= 64, f"--max-context must be >= 64, got {self.max_context}")
        check(self.kv_cache_slots >= 1, f"--kv-cache-slots must be >= 1, got {self.kv_cache_slots}")
        check(
            1 <= self.default_max_tokens < self.max_context,
            f"--default-max-tokens must be in [1, max_context), got {self.default_max_tokens}",
        )
        check(0 < self.min_pixels <= self.max_pixels, "--min-pixels must be > 0 and <= --max-pixels")
        check(self.max_pixels <= 16_777_216, "--max-pixels is above the checkpoint's own limit (16,777,216)")
        check(self.max_source_pixels >= self.max_pixels, "--max-source-pixels must be >= --max-pixels")
        check(self.max_images >= 1, "--max-images must be >= 1")
        check(0 <= self.prefill_hold_ms <= 1000, f"--prefill-hold-ms must be in [0, 1000], got {self.prefill_hold_ms}")
        try:
            sizes = parse_image_sizes(self.vision_graph_sizes)
        except ValueError as exc:
            raise OptionError(f"--vision-graph-sizes: {exc}") from None
        check(not sizes or self.vision_backend == "decoder", "--vision-graph-sizes needs --vision-backend decoder (the tower's graphs are the decoder's)")
        for name in ("preprocess_instances", "vision_instances"):
            check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        try:
            self.tier_table
        except (OSError, ValueError) as exc:
            raise OptionError(f"--tiers {self.tiers}: {exc}") from None

    @property
    def tier_table(self) -> TierTable:
        return DEFAULT_TIERS if self.tiers is None else TierTable.from_json(Path(self.tiers).read_text())

    @property
    def vision_int8(self) -> bool:
        return self.vision_weights == "int8" or (self.vision_weights == "auto" and self.quant != "none")

    def to_json(self) -> dict:
        data = asdict(self)
        data["output"] = str(self.output)
        data["tiers"] = json.loads(self.tier_table.to_json())
        data["gpus"] = list(self.gpus)
        return data


def option_fields():
    """The fields of BuildOptions, for the CLI."""
    return fields(BuildOptions)
