"""The real perf_analyzer against the real server: gRPC streaming, prompts and images of several
sizes (and two-image and text-only requests), two concurrencies, its CSV.

perf_analyzer comes from ``scripts/get_perf_analyzer.sh`` (.ci/run fetches it into
.perf_analyzer/); set PERF_ANALYZER to use another one. The first of these that starts is used
(tritonclient 2.59's own, on PATH in the venv, needs glibc 2.38); without one the test skips.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from perf_analyzer_load import mixed_entries, run_perf_analyzer  # noqa: E402



def working_perf_analyzer() -> str | None:
    candidates = [os.environ.get("PERF_ANALYZER"), str(ROOT / ".perf_analyzer" / "perf_analyzer"), shutil.which("perf_analyzer")]
    for path in filter(None, candidates):
        if os.access(path, os.X_OK) and subprocess.run([path, "--version"], capture_output=True).returncode == 0:
            return path
    return None


PERF_ANALYZER = working_perf_analyzer()

pytestmark = [
    pytest.mark.server,
    pytest.mark.slow,
    pytest.mark.skipif(PERF_ANALYZER is None, reason="no perf_analyzer that starts here (scripts/get_perf_analyzer.sh)"),
]


@pytest.mark.parametrize("concurrency", [1, 2])
def test_perf_analyzer_streams_a_mix_of_requests(server, tmp_path, concurrency):
    entries = mixed_entries()
    assert {len(images) for _, images in entries} == {0, 1, 2}
    result = run_perf_analyzer(
        PERF_ANALYZER, server.grpc_url, entries, concurrency, tmp_path, max_tokens=8, measurement_ms=3000, timeout_s=300
    )
    assert result["returncode"] == 0, result["csv"]
    rows = list(csv.DictReader(io.StringIO(result["csv"])))
    assert len(rows) == 1 and int(rows[0]["Concurrency"]) == concurrency
    assert float(rows[0]["Inferences/Second"]) > 0
    assert result["requests_per_s"] == float(rows[0]["Inferences/Second"]) and result["output_tok_per_s"] == round(8 * result["requests_per_s"], 1)
    # Streaming: each request's 8 tokens arrive in several responses.
    assert float(rows[0]["Response Throughput"]) > float(rows[0]["Inferences/Second"])
