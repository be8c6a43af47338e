"""A continuous-batching decoder engine: requests join and leave the running batch every step.

scheduler and slots are plain Python (no torch), unit-tested on their own; runner owns the model
and the KV cache; engine runs the loop on one thread. ``Engine`` is imported on first use, so that
the torch-free parts (requests, metrics, the step log) load without torch: benchmark clients
import them in every client process.
"""

from .request import FinishReason, SamplingParams, Sequence, StepOutput

__all__ = ["Engine", "FinishReason", "SamplingParams", "Sequence", "StepOutput"]


def __getattr__(name: str):
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
