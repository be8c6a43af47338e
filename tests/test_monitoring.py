"""Monitoring files: the Prometheus config and alert rules checked, and unit-tested, by the real
promtool; every query of the Grafana dashboard parsed by it. (`.ci/run` installs Debian's
prometheus package for promtool.)"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).parents[1] / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


def promtool(*args: str, cwd: Path) -> str:
    out = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


@needs_promtool
def test_prometheus_config_and_its_rules_are_valid():
    report = promtool("check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")
    assert "SUCCESS: 4 rules found" in report


@needs_promtool
def test_alert_rules_fire_on_their_test_series():
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml", cwd=DEPLOY / "prometheus")


@needs_promtool
def test_every_dashboard_query_parses(tmp_path):
    dashboard = json.loads((DEPLOY / "grafana" / "qwen3vl-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    # promtool parses PromQL when checking rules: each query becomes a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"panel:{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(json.dumps(rules))  # JSON is YAML
    assert f"SUCCESS: {len(exprs)} rules found" in promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    # The dashboard covers what the sharing issue asks to watch.
    text = " ".join(exprs)
    for metric in (
        "qwen3vl_gateway_time_to_first_token_seconds_bucket",  # TTFT p95 per tier
        "qwen3vl_gateway_generated_tokens_total",  # time per output token
        "qwen3vl_queue_length",
        "qwen3vl_rejected_total",
        "qwen3vl_generated_tokens_total",  # tokens/s
        "qwen3vl_kv_slots_used",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_utilization",
    ):
        assert metric in text, metric
