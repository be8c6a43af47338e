"""The gateway's Prometheus metrics, labelled by tier (never by key or tenant: bounded labels).

Each app has its own registry, filled from the one record every request ends with (the same
record the JSON log line prints)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        prefix = "qwen3vl_gateway"
        self.requests = Counter(f"{prefix}_requests", "requests by tier and HTTP status", ["tier", "status"], registry=self.registry)
        self.rate_limited = Counter(
            f"{prefix}_rate_limited", "429 answers by tier and limit", ["tier", "limit"], registry=self.registry
        )
        self.ttft = Histogram(
            f"{prefix}_time_to_first_token_seconds", "time to the first token", ["tier"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.duration = Histogram(
            f"{prefix}_request_duration_seconds", "whole request", ["tier"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.generated = Counter(f"{prefix}_generated_tokens", "tokens generated", ["tier"], registry=self.registry)
        self.prompt = Counter(f"{prefix}_prompt_tokens", "prompt tokens, image tokens included", ["tier"], registry=self.registry)

    def observe(self, record: dict) -> None:
        tier = record.get("tier") or "none"
        self.requests.labels(tier, str(record["status"])).inc()
        if record.get("limit"):
            self.rate_limited.labels(tier, record["limit"]).inc()
        if "ttft_ms" in record:
            self.ttft.labels(tier).observe(record["ttft_ms"] / 1e3)
        self.duration.labels(tier).observe(record["duration_ms"] / 1e3)
        self.generated.labels(tier).inc(record.get("completion_tokens", 0))
        self.prompt.labels(tier).inc(record.get("prompt_tokens", 0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
