"""Weight-only 8-bit layers for the decoder: int8 or fp8 (e4m3) weights, one fp32 scale per row.

Two phases, as in gpt-fast: the builder quantizes the state dict offline (``quantize_weight``);
at load time ``swap_in_quantized`` replaces the float modules by these, filled from that state
dict. Key convention: ``<name>.weight`` (int8 / float8_e4m3fn, [out, in]) and
``<name>.weight_scale`` (float32, [out]); dequantized weight = weight * scale[:, None].

The math lives in ``quant_matmul`` (the CPU path and the reference); on CUDA
``gpu.use_gpu_kernels`` sets each module's ``matmul`` to a fused kernel (kernels/).
"""

from __future__ import annotations

import torch
from torch import nn

# Storage dtype and largest representable magnitude of each mode. int8 stops at 127, not -128,
# so that the grid is symmetric and -w quantizes to -q.
MODES = {
    "int8": (torch.int8, 127.0),
    "fp8": (torch.float8_e4m3fn, 448.0),
}


def _mode(mode: str) -> tuple[torch.dtype, float]:
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of {sorted(MODES)}")
    return MODES[mode]


def quantize_weight(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric quantization of a [out, in] weight.

    Returns (qweight [out, in] int8 or float8_e4m3fn, scale [out] float32), scale = absmax / qmax.
    """
    dtype, qmax = _mode(mode)
    if w.ndim != 2:
        raise ValueError(f"quantize_weight: expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    w = w.float()  # [out, in]; bf16 / fp16 checkpoints are quantized from exact fp32 values
    # An all-zero row would give scale 0 and 0/0 below; any positive scale quantizes it to 0.
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / qmax  # [out]
    scaled = w / scale[:, None]  # [out, in], within [-qmax, qmax]
    if dtype == torch.int8:
        scaled = scaled.round()
    # The fp8 cast rounds to nearest even; the clamp only guards against fp32 rounding above 448.
    qweight = scaled.clamp(-qmax, qmax).to(dtype)
    return qweight, scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float weight [out, in] from a quantized weight [out, in] and its row scales [out]."""
    return (qweight.float() * scale.float()[:, None]).to(dtype)


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ dequantized qweight [out, in]^T (+ bias [out]) -> [..., out], in x's dtype.

    The scale is applied to the output rather than the weight: one multiply per output instead
    of one per weight element.
    """
    y = (x @ qweight.to(x.dtype).T) * scale.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


class _QuantStorage(nn.Module):
    """Holds ``weight`` (8-bit, [out, in]) and ``weight_scale`` (fp32, [out]) that ``.to(dtype)`` keeps.

    ``Module.to(torch.bfloat16)`` casts every floating buffer, and fp8 counts as floating: an fp8
    model moved with ``.to("cuda", torch.bfloat16)`` would silently double its weight memory and
    round its scales. Only device moves reach these two buffers.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        if qweight.dtype not in {dtype for dtype, _ in MODES.values()}:
            raise ValueError(f"quantized weight must be int8 or float8_e4m3fn, got {qweight.dtype}")
        if qweight.ndim != 2 or scale.shape != (qweight.shape[0],):
            raise ValueError(f"weight {tuple(qweight.shape)} needs one scale per row, got {tuple(scale.shape)}")
        self.register_buffer("weight", qweight)  # [out, in]
        self.register_buffer("weight_scale", scale.float())  # [out]
        # The product; gpu.use_gpu_kernels swaps in a fused kernel on CUDA.
        self.matmul = quant_matmul

    def _apply(self, fn, recurse=True):
        weight, scale = self.weight, self.weight_scale
        super()._apply(fn, recurse)
        self.weight = weight.to(self.weight.device)
        self.weight_scale = scale.to(self.weight_scale.device)
        return self


class QuantLinear(_QuantStorage):
    """Drop-in for ``nn.Linear`` with a weight-only 8-bit weight; computes in the input's dtype."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(qweight, scale)
        self.register_buffer("bias", bias)  # [out] or None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]. The bias goes to the product: on the GPU a prefill adds it in
        cuBLAS's epilogue."""
        return self.matmul(x, self.weight, self.weight_scale, self.bias)


class QuantEmbedding(_QuantStorage):
    """Token embedding with an 8-bit table [vocab, hidden]; also the tied lm_head (``logits``).

    A lookup has no float input to take a dtype from, so the output dtype is ``compute_dtype``,
    which follows ``.to(dtype)`` / ``.half()`` like a float module's weight would.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, compute_dtype: torch.dtype = torch.float32):
        super().__init__(qweight, scale)
        self.compute_dtype = compute_dtype

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # fn is opaque (.to, .half, .cuda, ...): ask it what it does to a float of our dtype.
        self.compute_dtype = fn(torch.empty((), dtype=self.compute_dtype)).dtype
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., hidden]
        # Gather as bytes: index kernels for float8 are not available on every device and version.
        rows = self.weight.view(torch.uint8)[input_ids].view(self.weight.dtype)  # [..., hidden]
        return (rows.float() * self.weight_scale[input_ids].unsqueeze(-1)).to(self.compute_dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., hidden] -> [..., vocab]
        """hidden @ W^T with W the dequantized table: the lm_head tied to this embedding."""
        return self.matmul(hidden, self.weight, self.weight_scale)


class QuantTiedHead(nn.Module):
    """An lm_head tied to a ``QuantEmbedding``: shares its one quantized table."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self.embedding = embedding  # the same module object; state_dict lists it under both names

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., hidden] -> [..., vocab]
        return self.embedding.logits(hidden)


def swap_in_quantized(module: nn.Module, state_dict: dict[str, torch.Tensor], mode: str) -> nn.Module:
    """Replace, in place, each ``nn.Linear`` / ``nn.Embedding`` of ``module`` whose
    ``<name>.weight_scale`` is in ``state_dict`` by its quantized module, loaded from
    ``<name>.weight`` and ``<name>.weight_scale`` (and ``<name>.bias`` if present).

    An ``nn.Linear`` whose weight is the very Parameter of a swapped embedding (a tied lm_head)
    becomes a ``QuantTiedHead`` of that embedding. Other float weights are not loaded here.
    The new modules sit on the float module's device (the state dict's, if that is meta).
    Names are relative to ``module``. Raises ValueError if a tensor has the wrong dtype for
    ``mode`` or the wrong shape, or if a quantized tensor matches no module.
    """
    dtype, _ = _mode(mode)
    wanted = {key.removesuffix(".weight_scale") for key in state_dict if key.endswith(".weight_scale")}
    found = {}  # name -> float module to replace
    for name, child in module.named_modules():
        if name in wanted:
            if not isinstance(child, (nn.Linear, nn.Embedding)):
                raise ValueError(f"{name}: quantized weights given for a {type(child).__name__}")
            found[name] = child
    if wanted - found.keys():
        raise ValueError(f"quantized tensors match no Linear/Embedding: {sorted(wanted - found.keys())}")

    # id(float weight Parameter) -> QuantEmbedding; ``found`` keeps those Parameters alive, so
    # their ids cannot be reused while we look for Linear layers tied to them.
    swapped_embeddings = {}
    for name, old in found.items():
        qweight, scale = state_dict[f"{name}.weight"], state_dict[f"{name}.weight_scale"]
        if qweight.dtype != dtype:
            raise ValueError(f"{name}.weight is {qweight.dtype}, but mode {mode!r} stores {dtype}")
        if qweight.shape != old.weight.shape:
            raise ValueError(f"{name}.weight: shape {tuple(qweight.shape)}, module has {tuple(old.weight.shape)}")
        # Land on the float module's device, unless it was built on the meta device (nothing
        # materialized yet): then the loaded tensors are the real ones and stay where they are.
        device = qweight.device if old.weight.is_meta else old.weight.device
        qweight, scale = qweight.to(device), scale.to(device)
        if isinstance(old, nn.Embedding):
            new = QuantEmbedding(qweight, scale, compute_dtype=old.weight.dtype)
            swapped_embeddings[id(old.weight)] = new
        else:
            bias = state_dict.get(f"{name}.bias", old.bias)
            new = QuantLinear(qweight, scale, None if bias is None else bias.detach().to(device))
        module.set_submodule(name, new)

    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear) and id(child.weight) in swapped_embeddings:
            module.set_submodule(name, QuantTiedHead(swapped_embeddings[id(child.weight)]))
    return module
