"""The engine's per-tier counters and gauges as Triton custom metrics (Prometheus, port 8002).

Published from a background thread twice a second, not from the decode loop: each update crosses
the stub's IPC, which the per-token path must not wait on. Imported only inside a Triton model.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from .periodic import Periodic

PREFIX = "qwen3vl"
COUNTERS = {  # TierCounters field -> (metric name, help)
    "requests": ("requests_total", "requests accepted into a tier's queue"),
    "rejected": ("rejected_total", "requests refused at once (queue full, over the tier's limits)"),
    "timed_out": ("timed_out_total", "requests that waited past their tier's queue timeout"),
    "cancelled": ("cancelled_total", "requests ended early because their client left"),
    "tokens": ("generated_tokens_total", "output tokens generated"),
    "ttft_seconds_sum": ("time_to_first_token_seconds_sum", "sum of times to first token (engine)"),
    "ttft_count": ("time_to_first_token_seconds_count", "requests that got a first token"),
}


class EngineMetricsPublisher(Periodic):
    """engine_name: the ``engine`` label of every metric (the model instance): with one engine per
    GPU each publishes its own series, which dashboards sum by tier."""

    def __init__(self, engine, engine_name: str, interval_s: float = 0.5):
        super().__init__("engine-metrics", interval_s, self._publish_or_stop)
        self.engine = engine
        tiers = [t.name for t in engine.tiers.tiers]
        # Triton deletes a family's metrics with it: keep every family alive as long as this object.
        self._families = []

        def family(name, help_text, kind):
            self._families.append(pb_utils.MetricFamily(name=f"{PREFIX}_{name}", description=help_text, kind=kind))
            return self._families[-1]

        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        engine_only = {"engine": engine_name}
        per_tier = lambda fam: {tier: fam.Metric(labels={"tier": tier, **engine_only}) for tier in tiers}  # noqa: E731
        self.counters = {field: per_tier(family(name, help_text, counter)) for field, (name, help_text) in COUNTERS.items()}
        queue, running = family("queue_length", "requests waiting, per tier", gauge), family("running_requests", "requests decoding, per tier", gauge)
        self.queue, self.running = per_tier(queue), per_tier(running)
        self.kv_used = family("kv_slots_used", "KV-cache slots held by running requests", gauge).Metric(labels=engine_only)
        self.kv_total = family("kv_slots_total", "KV-cache slots in the pool", gauge).Metric(labels=engine_only)
        self.batch = family("decode_batch_size", "sequences in the last decode step", gauge).Metric(labels=engine_only)
        # Where the engine thread's time goes (Engine.step's phases), to compare with the engine alone.
        self.steps = family("engine_steps_total", "engine steps (admit, prefill, decode, read back)", counter).Metric(labels=engine_only)
        self._phase_family = family("engine_phase_seconds_total", "engine thread's wall seconds per step phase (Engine.step)", counter)
        self.prefill_steps = family("prefill_steps_total", "engine steps that prefilled newcomers", counter).Metric(labels=engine_only)
        self.prefilled = family("prefilled_prompts_total", "prompts prefilled (over prefill_steps_total: how many a prefill batches)", counter).Metric(labels=engine_only)
        # Each capture stalls every stream (engine/vision_graphs.py); build-repo --vision-graph-sizes avoids them.
        self.vision_captures = family("vision_graph_captures_total", "vision tower CUDA graphs captured while serving (first sight of an image size)", counter).Metric(labels=engine_only)
        self.vision_capture_seconds = family("vision_graph_capture_seconds_total", "engine thread's seconds spent capturing them (every stream waits)", counter).Metric(labels=engine_only)
        self._engine_labels = engine_only
        self.phase_metrics = {}  # phase -> its counter, made when the engine first reports the phase
        self._published = {}  # counter key -> the total already added to the Prometheus counter

    def _publish_or_stop(self) -> bool:
        try:
            self.publish()
            return True
        except Exception as exc:  # metrics must never take the model down; say it once
            pb_utils.Logger.log_error(f"engine metrics stopped: {exc}")
            return False

    def _increment_to(self, metric, key, value: float) -> None:
        """Bring a Prometheus counter up to the engine's running total ``value``."""
        delta = value - self._published.get(key, 0)
        if delta:
            metric.increment(delta)
            self._published[key] = value

    def publish(self) -> None:
        scheduler = self.engine.scheduler
        for tier, counters in self.engine.metrics.snapshot().items():
            for field, metrics in self.counters.items():
                self._increment_to(metrics[tier], (field, tier), getattr(counters, field))
            self.queue[tier].set(len(scheduler.waiting[tier]))
            self.running[tier].set(scheduler.running_by_tier[tier])
        self.kv_total.set(scheduler.slots.num_slots)
        self.kv_used.set(scheduler.slots.num_slots - scheduler.slots.num_free)
        self.batch.set(self.engine.metrics.batch_size)
        totals = self.engine.metrics.step_totals()
        self._increment_to(self.steps, "steps", totals.steps)
        self._increment_to(self.prefill_steps, "prefill_steps", totals.prefill_steps)
        self._increment_to(self.prefilled, "prefilled", totals.prefilled)
        self._increment_to(self.vision_captures, "vision_captures", totals.vision_captures.count)
        self._increment_to(self.vision_capture_seconds, "vision_capture_seconds", totals.vision_captures.seconds)
        for phase, total in totals.seconds.items():
            if phase not in self.phase_metrics:
                self.phase_metrics[phase] = self._phase_family.Metric(labels={"phase": phase, **self._engine_labels})
            self._increment_to(self.phase_metrics[phase], ("phase", phase), total)
