"""Tiers through the real server: the tier parameter reaches the engine, and its per-tier
counters reach Triton's Prometheus endpoint."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest

from builder.cli import main as build_repo
from builder.client import GenerationError, stream_generate

pytestmark = [pytest.mark.server, pytest.mark.slow]


def metric(server, name: str, tier: str) -> float:
    """The tier's value summed over the server's engines (one series per engine)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    found = re.findall(rf'^qwen3vl_{name}{{[^}}]*tier="{tier}"[^}}]*}} ([0-9.e+-]+)$', text, re.MULTILINE)
    return sum(float(value) for value in found)


def test_tier_parameter_reaches_the_engine_and_its_metrics(server):
    before = metric(server, "generated_tokens_total", "vip")
    responses = list(stream_generate(server.grpc_url, "Hi", parameters={"max_tokens": 5, "tier": "vip"}, priority=1))
    assert sum(len(r["token_ids"]) for r in responses) == 5
    deadline = time.monotonic() + 10  # the engine publishes its counters twice a second
    while metric(server, "generated_tokens_total", "vip") < before + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server, "generated_tokens_total", "vip") == before + 5
    assert metric(server, "requests_total", "vip") >= 1
    # Where the engine's time went: steps, and wall seconds per step phase (Engine.step's)
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    steps = re.findall(r"^qwen3vl_engine_steps_total\{[^}]*\} ([0-9.e+-]+)$", text, re.MULTILINE)
    phases = dict(re.findall(r'^qwen3vl_engine_phase_seconds_total\{[^}]*phase="(\w+)"[^}]*\} ([0-9.e+-]+)$', text, re.MULTILINE))
    assert sum(map(float, steps)) >= 5 and {"schedule", "prefill", "decode", "wait", "output"} <= set(phases)
    assert all(float(seconds) > 0 for seconds in phases.values())
    # and how many prompts each prefill took (this test's request among them)
    prefills = [re.findall(rf"^qwen3vl_{name}_total\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.MULTILINE) for name in ("prefill_steps", "prefilled_prompts")]
    steps, prompts = (sum(map(float, found)) for found in prefills)
    assert 1 <= steps <= prompts
    # no vision graph is ever captured on the CPU (and none at all without the tower in the decoder)
    captures = [re.findall(rf"^qwen3vl_vision_graph_{name}_total\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.MULTILINE) for name in ("captures", "capture_seconds")]
    assert captures == [["0"], ["0"]]


def test_unknown_tier_and_tier_token_limit_are_clear_errors(server):
    with pytest.raises(GenerationError, match="unknown tier 'gold'; this server has vip, standard, free"):
        list(stream_generate(server.grpc_url, "Hi", parameters={"tier": "gold", "max_tokens": 2}))
    with pytest.raises(GenerationError, match="max_tokens 600 is over the free tier's limit of 512"):
        list(stream_generate(server.grpc_url, "Hi", parameters={"tier": "free", "max_tokens": 600}))


def test_bad_tiers_file_is_refused(tiny_checkpoint, tmp_path, capsys):
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps({"default": "a", "tiers": [{"name": "a", "priority": 2}]}))
    assert build_repo(["--model", str(tiny_checkpoint), "--output", str(tmp_path / "out"), "--tiers", str(tiers)]) == 2
    assert "--tiers" in capsys.readouterr().err


def test_tier_load_generator_runs_bounded_and_reports_each_tier(server):
    """A short open-loop run (fixed seed, so the same arrivals every time) ends by itself."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import load_tiers

    from model_repository.qwen3vl_runtime.tiers import DEFAULT_TIERS

    started = time.monotonic()
    results = load_tiers.run(server.grpc_url, DEFAULT_TIERS, {"vip": 3.0, "free": 3.0}, 2.0, 4, 60.0, seed=1)
    summary = load_tiers.summarize(results, 2.0)
    assert time.monotonic() - started < 60
    assert set(summary) == {"vip", "free"}
    for row in summary.values():
        assert row["requests"] == row["ok"] + row["rejected"] + row["timed_out"] + row["errors"]
        assert row["errors"] == 0
    assert summary["vip"]["ok"] == summary["vip"]["requests"] > 0


def test_tier_cap_holds_across_two_engines(build, tmp_path):
    """Two decoder engines in one server (what --gpus 0,1 gives; here two CPU instances of the
    decoder): a tier capped at 1 decodes one request at a time, whichever engine Triton picks."""
    from concurrent.futures import ThreadPoolExecutor

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from builder.reconfigure import reconfigure_repository
    from builder.serve import TritonServer

    source, _ = build("none")
    solo = {"name": "solo", "priority": 1, "max_concurrent": 1, "queue_timeout_s": 60, "max_queue": 16, "max_tokens": 64}
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps({"default": "solo", "tiers": [solo]}))
    repository = tmp_path / "two-engines"
    reconfigure_repository(source, {"tiers": tiers}, repository)
    config_path = repository / "language_model" / "config.pbtxt"
    config = text_format.Parse(config_path.read_text(), mc.ModelConfig())
    config.instance_group[0].count = 2
    config_path.unlink()  # a hard-linked copy: replace the file, keep the source's
    config_path.write_text(text_format.MessageToString(config))

    def timed(i: int) -> tuple[float, float]:
        times = []
        parameters = {"max_tokens": 40, "ignore_eos": True, "temperature": 0}
        for _ in stream_generate(server.grpc_url, f"Request {i}.", parameters=parameters):
            times.append(time.monotonic())
        return times[0], times[-1]

    with TritonServer(repository) as server:
        with ThreadPoolExecutor(6) as pool:
            spans = sorted(pool.map(timed, range(6)))
        deadline = time.monotonic() + 10  # the engines publish their counters twice a second
        while sum(metric_series(server, "generated_tokens_total", "solo").values()) < 6 * 40 and time.monotonic() < deadline:
            time.sleep(0.2)
        engines = metric_series(server, "generated_tokens_total", "solo")
    assert len(engines) == 2 and all(tokens > 0 for tokens in engines.values()), engines  # both engines served
    for (start, end), (next_start, next_end) in zip(spans, spans[1:]):
        overlap = max(0.0, min(end, next_end) - next_start)
        # Admission waits for the previous request's retirement; only the last response's trip
        # to the client may still overlap the next request's first token.
        assert overlap < 0.1 * (end - start), (spans, overlap)


def metric_series(server, name: str, tier: str) -> dict[str, float]:
    """{engine label: value} of one tier's series."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    found = re.findall(rf'^qwen3vl_{name}{{([^}}]*tier="{tier}"[^}}]*)}} ([0-9.e+-]+)$', text, re.MULTILINE)
    return {re.search(r'engine="([^"]*)"', labels).group(1): float(value) for labels, value in found}
