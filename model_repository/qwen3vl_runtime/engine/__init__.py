"""A continuous-batching decoder engine: requests join and leave the running batch every step.

scheduler and slots are plain Python (no torch), unit-tested on their own; runner owns the model
and the KV cache; engine runs the loop on one thread.
"""

from .engine import Engine
from .request import FinishReason, SamplingParams, Sequence, StepOutput

__all__ = ["Engine", "FinishReason", "SamplingParams", "Sequence", "StepOutput"]
