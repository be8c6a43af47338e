"""configure-repo: serving settings change in the configs only; the weights stay as built."""

from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from builder.client import stream_generate
from builder.reconfigure import main as configure_repo
from builder.serve import TritonServer

ONE_TIER = {
    "default": "bulk",
    "tiers": [
        {"name": "bulk", "priority": 1, "max_concurrent": 8, "queue_timeout_s": 5, "max_queue": 32, "max_tokens": 256}
    ],
}


def _config(repository, model: str) -> mc.ModelConfig:
    return text_format.Parse((repository / model / "config.pbtxt").read_text(), mc.ModelConfig())


def _parameters(repository) -> dict:
    return {k: v.string_value for k, v in _config(repository, "language_model").parameters.items()}


@pytest.mark.server
def test_linked_copy_gets_new_tiers_and_kv_pool_and_serves(build, tmp_path):
    source, _ = build("none")
    before = {p: p.read_bytes() for p in source.rglob("config.pbtxt")}
    tiers = tmp_path / "tiers.json"
    tiers.write_text(json.dumps(ONE_TIER))
    copy = tmp_path / "bulk"
    argv = [str(source), "--output", str(copy), "--tiers", str(tiers), "--kv-cache-slots", "8", "--max-images", "2"]
    assert configure_repo(argv) == 0

    params = _parameters(copy)
    assert params["kv_cache_slots"] == "8" and json.loads(params["tiers"])["default"] == "bulk"
    assert _config(copy, "preprocess").parameters["max_images"].string_value == "2"
    batching = _config(copy, "vision_encoder").dynamic_batching
    assert batching.priority_levels == 1 and batching.priority_queue_policy[1].default_timeout_microseconds == 5_000_000
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["options"]["kv_cache_slots"] == 8 and manifest["options"]["output"] == str(copy)
    assert manifest["reconfigured"]["changes"] == ["kv_cache_slots", "max_images", "tiers"]
    # The weights are the source's own files (hard links); the source's configs are untouched.
    weights = "language_model/1/decoder/model.safetensors"
    assert (copy / weights).stat().st_ino == (source / weights).stat().st_ino
    assert {p: p.read_bytes() for p in source.rglob("config.pbtxt")} == before
    assert _parameters(source)["kv_cache_slots"] == "4"

    with TritonServer(copy) as server:
        answer = list(
            stream_generate(server.grpc_url, "Hi", parameters={"tier": "bulk", "max_tokens": 3, "temperature": 0})
        )
    assert sum(len(r["token_ids"]) for r in answer) == 3


def test_graphed_prefill_reaches_the_decoder_config(build, tmp_path):
    """Off by default; configure-repo turns it on without a rebuild (the engine reads it on CUDA)."""
    source, _ = build("none", "decoder")
    assert _parameters(source)["graphed_prefill"] == "False"
    assert configure_repo([str(source), "--output", str(tmp_path / "graphed"), "--graphed-prefill"]) == 0
    assert _parameters(tmp_path / "graphed")["graphed_prefill"] == "True"
    assert not (tmp_path / "graphed" / "vision_encoder").exists()  # the layout is kept


@pytest.mark.server
def test_vision_graph_sizes_reach_the_decoder_which_serves_with_them(build, tmp_path, capsys):
    """--vision-graph-sizes is a serving option of the tower in the decoder: the decoder's config
    carries the sizes and the resize limits that make them patch grids, and the decoder starts and
    answers an image request with them (on the CPU the tower has no graphs to capture; tests/test_gpu.py
    captures them on CUDA)."""
    import io

    from PIL import Image

    source, _ = build("none", "decoder")
    assert _parameters(source)["vision_graph_sizes"] == ""
    target = tmp_path / "sized"
    assert configure_repo([str(source), "--output", str(target), "--vision-graph-sizes", "448x448, 1280x720"]) == 0
    parameters = _parameters(target)
    assert parameters["vision_graph_sizes"] == "448x448, 1280x720" and int(parameters["max_pixels"]) > 0
    png = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(png, format="PNG")
    with TritonServer(target) as server:
        responses = list(stream_generate(server.grpc_url, "What is this?", [png.getvalue()], parameters={"max_tokens": 3, "temperature": 0}))
    assert sum(len(r["token_ids"]) for r in responses) == 3
    # the tower's graphs are the decoder's: a repository with a vision model refuses the option
    onnx_source, _ = build("none")
    assert configure_repo([str(onnx_source), "--output", str(tmp_path / "x"), "--vision-graph-sizes", "448x448"]) == 2
    assert "--vision-graph-sizes needs --vision-backend decoder" in capsys.readouterr().err
    assert configure_repo([str(source), "--output", str(tmp_path / "y"), "--vision-graph-sizes", "448"]) == 2
    assert "--vision-graph-sizes: '448' is not an image size WIDTHxHEIGHT" in capsys.readouterr().err


def test_refuses_what_needs_a_rebuild_and_bad_values(build, tmp_path, capsys):
    source, _ = build("none")
    with pytest.raises(SystemExit):  # not a configure-repo option at all
        configure_repo([str(source), "--quant", "int8"])
    assert configure_repo([str(source), "--output", str(tmp_path / "x"), "--kv-cache-slots", "0"]) == 2
    assert "--kv-cache-slots must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # validated before anything is written
    assert configure_repo([str(tmp_path)]) == 2
    assert "not a repository written by build-repo" in capsys.readouterr().err
