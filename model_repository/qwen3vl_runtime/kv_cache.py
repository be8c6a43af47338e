"""One layer's KV cache: keys and values in the compute dtype, or int8 with a scale per token and head.

At 64 streams the decode step reads every running sequence's keys and values once per layer:
~300 cached tokens x 112 KiB (bf16) x 64 is 2.2 GB a step, more than the int8 weights' 1.7 GB.
int8 (build-repo --kv-cache-dtype int8) stores each key and value vector (one token, one KV head,
head_dim values) as int8 with its own float32 scale, absmax / 127: 132 bytes where bf16 takes 256.
Teacher-forced on the full-size random model against transformers float32 (bf16 weights,
docs/benchmarks.md, 2026-12-08): top-1 0.892 and mean logit cosine 0.99910 over the bf16 cache's
0.920 and 0.99958; fp8 e4m3 (unscaled, as vLLM's uncalibrated fp8 cache) took about the same
bytes for 0.735 and 0.99156, so it is not offered.

Every attention reads the keys and values as the cache holds them, the prompt's own included, so
the CPU reference, the eager and the captured GPU prefill and decode all see the same values. The
GPU kernels (``kernels.fused`` writes, ``kernels.online_softmax`` reads) round as ``quantize``
does: x * (127 / absmax), plus 0.5, floored, within +-127.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "int8")  # build-repo --kv-cache-dtype; auto: the compute dtype
QMAX = 127.0


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> (int8 [..., D], float32 scale [...]): per vector, scale = absmax / 127."""
    xf = x.float()
    absmax = xf.abs().amax(-1)
    q = torch.floor(xf * (QMAX / absmax.clamp_min(1e-30))[..., None] + 0.5).clamp(-QMAX, QMAX)
    return q.to(torch.int8), absmax / QMAX


@dataclass(frozen=True)
class LayerCache:
    """k, v: [slots, kv heads, max_len, head_dim], the compute dtype or int8; with int8, k_scale and
    v_scale [slots, kv heads, max_len] float32 (None otherwise)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @classmethod
    def empty(cls, slots: int, kv_heads: int, max_len: int, head_dim: int, *, dtype: torch.dtype, quantized: bool, device) -> "LayerCache":
        """A zeroed cache: int8 with scales when ``quantized``, else of ``dtype``."""
        shape = (slots, kv_heads, max_len, head_dim)
        if not quantized:
            return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        values = [torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(2)]
        scales = [torch.zeros(shape[:-1], dtype=torch.float32, device=device) for _ in range(2)]
        return cls(*values, *scales)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def write(self, index: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        """cache[index] = k, v ([..., head_dim], shaped as ``self.k[index]``), quantized if int8."""
        for values, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            if scales is None:
                values[index] = x.to(values.dtype)
            else:
                values[index], scales[index] = quantize(x)

    def read(self, index: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) at ``index`` as ``dtype``, dequantized if int8."""
        if not self.quantized:
            return self.k[index].to(dtype), self.v[index].to(dtype)
        return tuple((values[index].float() * scales[index][..., None]).to(dtype) for values, scales in ((self.k, self.k_scale), (self.v, self.v_scale)))

    def kernel_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V scales for a kernel's arguments; without scales (the kernel then reads
        none) two stand-ins of as many dimensions or more, for their pointers and strides."""
        return (self.k_scale, self.v_scale) if self.quantized else (self.k, self.v)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None)


def is_quantized(name: str) -> bool:
    """Whether a build option's KV cache dtype ``name`` is the int8 one."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown KV cache dtype {name!r}; expected one of {', '.join(KV_CACHE_DTYPES)}")
    return name == "int8"
