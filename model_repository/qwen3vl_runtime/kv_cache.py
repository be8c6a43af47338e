"""The KV cache's element type: the decoder's compute dtype, or fp8 (e4m3) at half the bytes.

At 64 streams the decode step reads every running sequence's keys and values once per layer:
~300 cached tokens x 112 KiB (bf16) x 64 is 2.2 GB a step, more than the int8 weights' 1.7 GB.
fp8 halves those bytes. Values are stored unscaled (a scale of 1, as vLLM's fp8 cache without
calibration): e4m3 keeps 3 mantissa bits over 2^-9..448, where the normed, rotated keys and the
values of a trained model are expected to sit (not checked on the real checkpoint: no weights
here); larger values saturate at 448, explicitly, so that PyTorch's cast (saturating in 2.13 on
the CPU; not checked on CUDA) and the GPU kernel that writes the cache (``kernels.fused``: PTX
``cvt.rn.satfinite``) agree whatever the version. Every attention reads the keys and values as the cache holds them, the
prompt's own included, so the CPU reference, the eager and the captured GPU prefill and decode
all see the same rounded values.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "fp8")  # build-repo --kv-cache-dtype; auto: the compute dtype
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def kv_cache_dtype(name: str, compute: torch.dtype) -> torch.dtype:
    """The cache's element type for a build option's ``name``."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown KV cache dtype {name!r}; expected one of {', '.join(KV_CACHE_DTYPES)}")
    return compute if name == "auto" else FP8


def to_cache(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """``x`` in the cache's element type (fp8: saturated at +-448, rounded to nearest even)."""
    if cache.dtype == FP8:
        x = x.float().clamp(-FP8_MAX, FP8_MAX)
    return x.to(cache.dtype)
