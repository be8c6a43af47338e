"""Programmatic dependent launch (Hopper and later): a kernel's programs start while the one
before it in the stream is finishing, and wait inside for its results.

Without it each kernel's programs are scheduled only once the previous kernel has completed and
its memory is flushed; a one-row int8 decode step is 293 kernels of 2-100 us. With it the next
kernel's programs become resident as the previous kernel's last ones run, and block in
``wait_for_previous`` until that kernel is done. Measured on the H200 (run 13,
scripts/profile_decode.py with QWEN3VL_PDL=0 and 1, the same kernels picked): the int8 decode
step's graph replay 1.544 -> 1.349 ms at one row, 3.083 -> 2.974 at 64.

The rule that keeps this correct: every kernel launched with ``launch_pdl`` waits before it writes
anything or reads what a kernel may have written (so when a kernel has finished, everything before
it has finished too, even kernels that do not use the programmatic launch, like cuBLAS's). Only
weights and their scales, written once when the model loads, are read before the wait (the
few-rows product's first step). CUDA graphs capture the programmatic edges as they are.
``QWEN3VL_PDL=0`` turns it off (an A/B switch for measurements).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """The first statement of a kernel that may be launched with ``launch_args``: wait for the
    previous kernel's results, then let the next kernel's programs launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def _enabled(device_index: int) -> bool:
    from triton.backends.nvidia.compiler import CUDAOptions

    return (
        os.environ.get("QWEN3VL_PDL", "1") != "0"
        and os.environ.get("TRITON_INTERPRET") != "1"
        and "launch_pdl" in CUDAOptions.__dataclass_fields__
        and torch.cuda.get_device_capability(device_index)[0] >= 9
    )


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched programmatically dependent."""
    return device.type == "cuda" and _enabled(device.index if device.index is not None else torch.cuda.current_device())


def launch_args(tensor: torch.Tensor) -> dict:
    """Keyword arguments for a launch whose kernel starts with ``wait_for_previous``: the PDL
    constexpr and, where it is ``enabled``, Triton's ``launch_pdl`` option."""
    return {"PDL": True, "launch_pdl": True} if enabled(tensor.device) else {"PDL": False}
