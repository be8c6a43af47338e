"""Service tiers: who is served first, how many at once, how long a request may wait.

One table drives both sides: the build turns it into every model's Triton priority queues, and
the decoder engine enforces it (a decoupled model drains Triton's queue at once, so Triton's
priority alone cannot order the engine's work). Plain Python, no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Tier:
    name: str
    priority: int  # Triton priority level, 1 = served first
    max_concurrent: int  # sequences of this tier decoding at once (per server)
    queue_timeout_s: float  # longest wait before decoding starts; then the request is rejected
    max_queue: int  # waiting requests of this tier; more are rejected at once
    max_tokens: int  # the most a request of this tier may ask for

    def __post_init__(self):
        problems = [
            f"{field} must be >= {low}"
            for field, low in (("priority", 1), ("max_concurrent", 1), ("max_queue", 0), ("max_tokens", 1))
            if not isinstance(getattr(self, field), int) or getattr(self, field) < low
        ]
        if not self.queue_timeout_s > 0:
            problems.append("queue_timeout_s must be > 0")
        if not self.name or not self.name.isidentifier():
            problems.append("name must be a simple identifier")
        if problems:
            raise ValueError(f"tier {self.name!r}: " + "; ".join(problems))


@dataclass(frozen=True)
class TierTable:
    tiers: tuple[Tier, ...]
    default: str  # the tier of requests that name none

    def __post_init__(self):
        names = [t.name for t in self.tiers]
        if not self.tiers:
            raise ValueError("at least one tier is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"tier names repeat: {names}")
        if sorted(t.priority for t in self.tiers) != list(range(1, len(self.tiers) + 1)):
            raise ValueError(f"tier priorities must be 1..{len(self.tiers)}, one each: {[t.priority for t in self.tiers]}")
        if self.default not in names:
            raise ValueError(f"default tier {self.default!r} is not one of {names}")

    def get(self, name: str | None) -> Tier:
        """The tier a request names (or the default); ValueError naming the known ones."""
        wanted = self.default if name in (None, "") else name
        for tier in self.tiers:
            if tier.name == wanted:
                return tier
        raise ValueError(f"unknown tier {name!r}; this server has {', '.join(t.name for t in self.by_priority())}")

    def by_priority(self) -> list[Tier]:
        return sorted(self.tiers, key=lambda t: t.priority)

    def to_json(self) -> str:
        return json.dumps({"default": self.default, "tiers": [asdict(t) for t in self.by_priority()]})

    @classmethod
    def from_json(cls, text: str) -> "TierTable":
        try:
            data = json.loads(text)
            return cls(tuple(Tier(**t) for t in data["tiers"]), data["default"])
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"bad tiers file: {exc}; expected {{'default': NAME, 'tiers': [{{...}}]}}") from None


# The seed's three tiers: VIP 4 at once, 1 s; Standard 2, 2 s; Free 1, 3 s.
DEFAULT_TIERS = TierTable(
    (
        Tier("vip", priority=1, max_concurrent=4, queue_timeout_s=1.0, max_queue=16, max_tokens=2048),
        Tier("standard", priority=2, max_concurrent=2, queue_timeout_s=2.0, max_queue=8, max_tokens=1024),
        Tier("free", priority=3, max_concurrent=1, queue_timeout_s=3.0, max_queue=4, max_tokens=512),
    ),
    default="standard",
)
