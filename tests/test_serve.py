"""builder.serve and builder.client against a real tritonserver serving tests/data/echo_repo.

The echo repository has the endpoint of a built repository but no weights, so these run in
seconds: every request streams its prompt back one word per response.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from builder import client
from builder.client import GenerationError, GenerationTimeout, stream_generate
from builder.serve import ServerStartError, TritonServer, failure_causes, free_ports
from model_repository.qwen3vl_runtime import specs

ECHO_REPO = Path(__file__).parent / "data" / "echo_repo"
# The echo preprocess accepts anything starting with PNG's signature as an image.
FAKE_PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PROTOCOLS = ("grpc", "http")


def _url(server: TritonServer, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def _accepts_connections(host_port: str) -> bool:
    host, port = host_port.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def _answer(server, prompt, protocol, **kwargs) -> list[dict]:
    return list(stream_generate(_url(server, protocol), prompt, protocol=protocol, timeout_s=20, **kwargs))


@pytest.fixture(scope="module")
def echo_server():
    with TritonServer(ECHO_REPO) as server:
        yield server


# --- units: no server ----------------------------------------------------------------------------
def test_failure_causes_name_the_model():
    log = (
        'I1125 pb_stub.cc:366] "Failed to initialize Python stub: RuntimeError: boom"\n'
        "E1125 model_lifecycle.cc:642] \"failed to load 'vision_encoder' version 1: Internal: "
        'RuntimeError: boom\\n\\nAt:\\n  /r/vision_encoder/1/model.py(3): initialize\\n"\n'
        "error: creating server: Internal - failed to load all models\n"
    )
    assert failure_causes(log) == [
        "model 'vision_encoder' (version 1) failed to load: Internal: RuntimeError: boom at "
        "/r/vision_encoder/1/model.py(3): initialize",
        "error: creating server: Internal - failed to load all models",
    ]


def test_free_ports_are_distinct():
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(p > 0 for p in ports)


def test_missing_repository_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        TritonServer(tmp_path / "nowhere")


# --- the server -----------------------------------------------------------------------------------
@pytest.mark.server
def test_start_serve_stop_beside_another_server(echo_server):
    """A second server picks its own free ports, serves, and releases them (and its Python
    models' shared memory) when stopped."""
    with TritonServer(ECHO_REPO) as second:
        assert list(Path("/dev/shm").glob(f"{second.shm_prefix}*")), "the Python backend named no region from the prefix"
        assert not set(second.ports) & set(echo_server.ports)
        assert len(set(second.ports)) == 3
        answer = _answer(second, "one two", "grpc")
        assert "".join(r["text"] for r in answer) == "one two "
        with urllib.request.urlopen(second.metrics_url, timeout=10) as metrics:
            assert b"nv_inference_request_success" in metrics.read()
    assert not second.running
    assert not list(Path("/dev/shm").glob(f"{second.shm_prefix}*"))
    assert not _accepts_connections(second.http_url) and not _accepts_connections(second.grpc_url)
    assert _answer(echo_server, "still here", "http")[-1]["finish_reason"] == "stop"


@pytest.mark.server
def test_broken_model_fails_fast_naming_it(tmp_path):
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    (repo / "broken" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('no weights here')\n"
    )
    started = time.monotonic()
    server = TritonServer(repo, ready_timeout_s=60)
    with pytest.raises(ServerStartError) as failure:
        server.start()
    assert time.monotonic() - started < 30
    message = str(failure.value)
    assert "model 'broken'" in message and "no weights here" in message
    assert not server.running
    server.log_path.unlink()  # kept for the user after a failure


@pytest.mark.server
def test_serve_repo_prints_addresses_and_stops_on_sigterm(echo_server):
    proc = subprocess.Popen(
        # Port 0: free ports (the CLI's defaults are Triton's 8000-8002).
        [sys.executable, "-m", "builder.serve", str(ECHO_REPO), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        addresses = dict(proc.stdout.readline().split() for _ in range(3))
        assert set(addresses) == {"HTTP", "gRPC", "metrics"}
        assert addresses["gRPC"] not in (echo_server.grpc_url, echo_server.http_url)
        answer = list(stream_generate(addresses["gRPC"], "hi there", timeout_s=20))
        assert answer[-1]["finish_reason"] == "stop"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not _accepts_connections(addresses["HTTP"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.server
def test_echo_endpoint_matches_specs(echo_server):
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(echo_server.http_url, network_timeout=10) as c:
        meta = c.get_model_metadata(specs.ENSEMBLE)
    declared = {(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["inputs"] + meta["outputs"]}
    wanted = {(s.name, s.dtype, s.dims) for s in specs.ENDPOINT_INPUTS + specs.ENDPOINT_OUTPUTS}
    assert declared == wanted


# --- the client -----------------------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stream_generate_streams_each_response(echo_server, protocol):
    answer = _answer(echo_server, "hello big world", protocol, images=[FAKE_PNG, FAKE_PNG[:100]])
    assert [r["text"] for r in answer] == [f"[images: {len(FAKE_PNG)},100] ", "hello ", "big ", "world "]
    assert [r["token_ids"] for r in answer] == [[0], [1], [2], [3]]
    assert [r["finish_reason"] for r in answer] == ["", "", "", "stop"]
    assert {r["prompt_tokens"] for r in answer} == {4}


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sampling_parameters_reach_the_models(echo_server, protocol):
    capped = _answer(echo_server, "a b c d", protocol, parameters={"max_tokens": 2})
    assert [r["text"] for r in capped] == ["a ", "b "] and capped[-1]["finish_reason"] == "length"
    stopped = _answer(echo_server, "a b c d", protocol, parameters={"stop": ["b", "c"]})
    assert [r["text"] for r in stopped] == ["a ", "b "] and stopped[-1]["finish_reason"] == "stop"


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_empty_prompt_gives_empty_lists(echo_server, protocol):
    assert _answer(echo_server, "", protocol) == [{"text": "", "token_ids": [], "finish_reason": "stop", "prompt_tokens": 0}]


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_errors_carry_the_server_message(echo_server, protocol):
    with pytest.raises(GenerationError, match="echo_lm: asked to fail"):
        _answer(echo_server, "fail please", protocol)
    received = []
    with pytest.raises(GenerationError, match="failed mid-stream"):
        for response in stream_generate(_url(echo_server, protocol), "a fail_mid", protocol=protocol, timeout_s=20):
            received.append(response["text"])
    assert received == ["a "]
    with pytest.raises(GenerationError, match="neither PNG"):
        _answer(echo_server, "a", protocol, images=[b"not an image!"])
    assert _answer(echo_server, "next one", protocol)[-1]["finish_reason"] == "stop"  # still serving


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_timeout_never_hangs(echo_server, protocol):
    started = time.monotonic()
    with pytest.raises(GenerationTimeout):
        list(stream_generate(_url(echo_server, protocol), "a sleep:4 b", protocol=protocol, timeout_s=1))
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unreachable_server_is_a_generation_error(protocol):
    (port,) = free_ports(1)
    with pytest.raises(GenerationError):
        list(stream_generate(f"127.0.0.1:{port}", "hi", protocol=protocol, timeout_s=5))


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ask_repo_prints_text_and_summary(echo_server, protocol, capsys, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(FAKE_PNG)
    argv = ["--url", _url(echo_server, protocol), "--protocol", protocol, "--prompt", "x y z", "--image", str(image), "--max-tokens", "3"]
    assert client.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"[images: {len(FAKE_PNG)}] x y \n")
    assert "finish: length, prompt tokens: 4, generated tokens: 3" in out


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_leaving_a_stream_early_returns_at_once(echo_server, protocol):
    answer = stream_generate(_url(echo_server, protocol), "x sleep:3 y", protocol=protocol, timeout_s=20)
    started = time.monotonic()
    assert next(answer)["text"] == "x "
    answer.close()  # cancels the request instead of waiting for the rest
    assert time.monotonic() - started < 2


def test_isolated_stub_interpreter_imports_what_the_caller_imports(monkeypatch, tmp_path):
    """The bundle's Python 3.12 stub runs its interpreter isolated (PYTHONPATH ignored): the venv
    that stub_python_env writes must still hand it the caller's import path. `python3 -I` is the
    same isolated start; it finds its prefix through PATH as the stub does."""
    import numpy

    from builder.server_setup import server_environment, stub_python_env

    extra = tmp_path / "caller-extra"
    extra.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(extra))
    stub_bin = stub_python_env(tmp_path)
    env = server_environment(None, stub_bin)
    probe = "import sys, numpy; print(repr(sys.path)); print(numpy.__file__)"
    out = subprocess.run(
        ["python3", "-I", "-c", probe], env=env, capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout.splitlines()
    assert str(extra) in out[0]
    assert out[1] == numpy.__file__


def test_refuses_numpy_2_with_the_bundled_stub(monkeypatch, tmp_path):
    """The bundled stub corrupts string inputs under numpy 2 (reproduced with Python 3.12)."""
    import numpy

    from builder.server_setup import bundled_stub_problem

    assert bundled_stub_problem(None) is None  # a server from PATH brings its own stub
    monkeypatch.setattr(numpy, "__version__", "2.5.2")
    assert "install numpy<2" in bundled_stub_problem(tmp_path)
    monkeypatch.setattr(numpy, "__version__", "1.26.4")
    assert bundled_stub_problem(tmp_path) is None
