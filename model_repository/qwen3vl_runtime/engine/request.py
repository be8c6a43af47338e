"""What a request asks for (sampling parameters) and the state of one sequence in the engine."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable


class FinishReason:
    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached, or the context is full
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings of one request; defaults come from the model's generation config."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks)

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {list(self.stop)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @classmethod
    def from_generation_config(cls, generation: dict[str, Any], **overrides: Any) -> "SamplingParams":
        """A checkpoint's generation_config.json as sampling settings (greedy unless do_sample)."""
        return cls(**{
            "temperature": float(generation.get("temperature", 1.0)) if generation.get("do_sample") else 0.0,
            "top_p": float(generation.get("top_p", 1.0)),
            "top_k": int(generation.get("top_k", 0)),
            **overrides,
        })  # fmt: skip

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any], defaults: "SamplingParams") -> "SamplingParams":
        """From request parameters (Triton gives strings, numbers and booleans); unknown keys pass."""
        values = {}
        for name, kind in (("max_tokens", int), ("top_k", int), ("seed", int), ("temperature", float), ("top_p", float)):
            if name in parameters:
                values[name] = _coerce(name, parameters[name], kind)
        if "stop" in parameters:
            values["stop"] = _stop_strings(parameters["stop"])
        if "ignore_eos" in parameters:
            values["ignore_eos"] = _flag("ignore_eos", parameters["ignore_eos"])
        return cls(**{**defaults.__dict__, **values})


def _coerce(name: str, value: Any, kind: type):
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = kind(value) if not isinstance(value, str) else kind(float(value) if kind is float else int(value))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return number


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _stop_strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.lstrip().startswith("[") else [value]
        except json.JSONDecodeError:
            raise ValueError(f"stop must be a string or a JSON list of strings, got {value!r}") from None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class StepOutput:
    """What one streamed response carries."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # None while the sequence goes on
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One request inside the engine: its prompt, what it generated, and where its KV cache lives.

    prompt: the runner's prefill inputs (token ids, positions, image rows; opaque here).
    emit: called on the engine thread with each StepOutput; the last one has a finish_reason.
    is_cancelled: asked on an interval by the engine's ``CancellationWatcher``; a cancelled sequence
    is ended at the engine's next step and its slot freed.
    """

    request_id: str
    prompt: Any
    prompt_len: int
    rope_delta: int
    params: SamplingParams
    emit: Callable[[StepOutput], None]
    is_cancelled: Callable[[], bool] = lambda: False
    tier_name: str | None = None  # the request's tier; None = the server's default tier
    output_ids: list[int] = field(default_factory=list)
    launched: int = 0  # output tokens whose computation is queued on the device (>= len(output_ids))
    slot: int | None = None
    finished: bool = False
    tier: Any = None  # the resolved Tier, set by the engine
    enqueued_at: float = 0.0
    submitted_at: float = 0.0

    @property
    def length(self) -> int:
        """Tokens whose keys and values are in the cache once the last output token is fed."""
        return self.prompt_len + len(self.output_ids)
