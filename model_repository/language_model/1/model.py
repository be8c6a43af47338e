"""Triton adapter of the decoder: a decoupled model that hands every request to one engine.

``execute`` returns at once; the engine thread batches all running requests each step and streams
one response per step to each (the last one flagged FINAL). Everything else lives in
``qwen3vl_runtime.engine``.
"""

import json
import os
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from qwen3vl_runtime.decoder_weights import load_text_model, load_vision_tower  # noqa: E402
from qwen3vl_runtime.engine import Engine, SamplingParams, Sequence, StepOutput  # noqa: E402
from qwen3vl_runtime.engine.runner import ModelRunner, PromptInputs  # noqa: E402
from qwen3vl_runtime.engine.server_caps import ServerTierCounts, default_path  # noqa: E402
from qwen3vl_runtime.engine.step_log import STEP_LOG_ENV, StepLog  # noqa: E402
from qwen3vl_runtime.engine.vision import ImageEncoder, ImageInputs  # noqa: E402
from qwen3vl_runtime.kv_cache import is_quantized  # noqa: E402
from qwen3vl_runtime.patches import checkpoint_pixel_table, parse_image_sizes, patch_grid  # noqa: E402
from qwen3vl_runtime.specs import DECODER_VISION_INPUTS, NUMPY_DTYPES  # noqa: E402
from qwen3vl_runtime.streaming import ResponseStreamer  # noqa: E402
from qwen3vl_runtime.tiers import TierTable  # noqa: E402
from qwen3vl_runtime.triton_metrics import EngineMetricsPublisher  # noqa: E402
from qwen3vl_runtime.triton_io import error_response, model_parameters, one_request_input, request_parameters  # noqa: E402

DECODER_DIR = Path(__file__).parent / "decoder"
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# A cancelled request is noticed within this time (its KV slot freed), not at the very next step:
# see Engine's cancel_check_interval_s.
CANCEL_CHECK_INTERVAL_S = 0.05
# The decode loop and the response sender share this process's GIL. At Python's default switch
# interval (5 ms) a busy sender can keep the loop waiting up to 5 ms each time it wants the GIL
# back (after every CUDA sync or copy). With this and the cancellation interval above, 64 streams
# decode at 7.9 ms per token through Triton, as the engine alone does (8.3); before, 31.8 ms
# (H100, docs/benchmarks.md; the two changes were measured together).
GIL_SWITCH_INTERVAL_S = 0.0005
# A request to this model with this parameter cancels the running request of that id (Triton 2.51
# does not pass a client's cancellation into a running ensemble step; the gateway sends this).
CANCEL_PARAMETER = "cancel_request_id"


def _step_log(instance_name: str) -> StepLog | None:
    """The engine's per-step log, where the server's environment says (one file per instance)."""
    prefix = os.environ.get(STEP_LOG_ENV)
    return StepLog(f"{prefix}.{instance_name.replace(' ', '_')}.jsonl") if prefix else None


def _vision_graph_grids(settings: dict, visual) -> tuple[tuple[int, int, int], ...]:
    """The patch grids of build-repo --vision-graph-sizes, resized as the preprocess model resizes
    (repositories built before the option name none)."""
    sizes = parse_image_sizes(settings.get("vision_graph_sizes", ""))
    if not sizes:
        return ()
    limits = {"min_pixels": int(settings["min_pixels"]), "max_pixels": int(settings["max_pixels"])}
    return tuple(patch_grid(w, h, patch=visual.config.patch_size, merge=visual.spatial_merge_size, **limits) for w, h in sizes)


def engines(model_config: dict) -> int:
    """The decoder instances of this server: one per listed GPU times each group's count."""
    return sum(int(g.get("count", 1)) * max(len(g.get("gpus", [])), 1) for g in model_config.get("instance_group", []))


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        settings = model_parameters(args)
        gpu = args["model_instance_kind"] == "GPU" and torch.cuda.is_available()
        device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        config = json.loads((DECODER_DIR / "config.json").read_text())
        generation = json.loads((DECODER_DIR / "generation_config.json").read_text())
        eos = generation.get("eos_token_id", config["text_config"].get("eos_token_id"))
        self.defaults = SamplingParams.from_generation_config(generation, max_tokens=int(settings["default_max_tokens"]))
        num_slots = int(settings["kv_cache_slots"])
        # With --vision-backend decoder the tower runs here and requests carry the images' patch bytes.
        visual = load_vision_tower(DECODER_DIR, device)
        self.vision_in_process = visual is not None
        vision = None
        if visual is not None:
            vision = ImageEncoder(visual, checkpoint_pixel_table(DECODER_DIR), graph_grids=_vision_graph_grids(settings, visual))
        runner = ModelRunner(
            load_text_model(DECODER_DIR, device),
            num_slots=num_slots,
            max_len=int(settings["max_context"]),
            image_token_id=config["image_token_id"],
            graphed_prefill=settings.get("graphed_prefill") == "True",
            vision=vision,
            # Repositories built before the option hold none: the compute dtype.
            quantized_kv=is_quantized(settings.get("kv_cache_dtype", "auto")),
        )
        self.logger = pb_utils.Logger
        for grid, buckets in runner.prepared_vision_graphs.items():
            self.logger.log_info(f"vision tower: CUDA graphs for {grid[1]}x{grid[2]} patches captured, {buckets} images per call")
        # Sends leave the decode loop's thread; with many streams each gets fewer, larger responses.
        self.streamer = ResponseStreamer(log=self.logger.log_error, streams=lambda: len(self.engine.scheduler.running)).start()
        tiers = TierTable.from_json(settings["tiers"])
        # One engine per GPU (instance): with several, the tier caps are the server's, counted
        # across them; a lone engine counts its own and needs no shared file.
        names = [t.name for t in tiers.tiers]
        shared = engines(json.loads(args["model_config"])) > 1
        self.server_counts = ServerTierCounts(default_path(args["model_name"], names), names) if shared else None
        self.engine = Engine(
            runner,
            AutoTokenizer.from_pretrained(DECODER_DIR),
            eos_token_ids=set(eos if isinstance(eos, list) else [eos]),
            num_slots=num_slots,
            tiers=tiers,
            cancel_check_interval_s=CANCEL_CHECK_INTERVAL_S,
            server_counts=self.server_counts,
            step_log=_step_log(args["model_instance_name"]),
            # Repositories built before the option hold nothing.
            prefill_hold_s=float(settings.get("prefill_hold_ms", 0)) / 1e3,
            log=self.logger.log_error,
        ).start()
        self.metrics = EngineMetricsPublisher(self.engine, args["model_instance_name"]).start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            parameters = request_parameters(request)
            cancel = parameters.get(CANCEL_PARAMETER)
            if cancel:  # a request that only names another one to cancel (its inputs are ignored)
                self.engine.cancel(str(cancel))
                sender.send(flags=FINAL)
                continue
            try:
                self.engine.submit(self._sequence(request, parameters, sender))
            except (ValueError, RuntimeError) as exc:
                sender.send(error_response(str(exc)), flags=FINAL)
        return None

    def _sequence(self, request, parameters: dict, sender) -> Sequence:
        # Each tensor comes as [1, ...] (the config's max_batch_size lets Triton hand over several
        # requests per execute: builder/configs.py); outputs go back the same way.
        ids = one_request_input(request, "input_ids", np.int64, ndim=1)
        positions = one_request_input(request, "position_ids", np.int64, ndim=2)
        if positions.shape != (3, len(ids)):
            raise ValueError(f"position_ids must be [3, {len(ids)}], got {list(positions.shape)}")
        if self.vision_in_process:
            arrays = {s.name: one_request_input(request, s.name, NUMPY_DTYPES[s.dtype], ndim=len(s.dims)) for s in DECODER_VISION_INPUTS}
            prompt = PromptInputs(torch.from_numpy(ids), torch.from_numpy(positions), images=ImageInputs.from_arrays(arrays))
        else:
            image_embeds = one_request_input(request, "image_embeds", np.float32, ndim=2)
            deepstack = one_request_input(request, "deepstack_embeds", np.float32, ndim=3)
            prompt = PromptInputs(
                torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(image_embeds), torch.from_numpy(deepstack)
            )
        params = SamplingParams.from_parameters(parameters, self.defaults)
        prompt_tokens = np.array([[len(ids)]], dtype=np.int32)

        def send(out: StepOutput) -> None:
            if out.error is not None:
                sender.send(error_response(out.error), flags=FINAL)
                return
            response = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("text", np.array([[out.text.encode()]], dtype=np.object_)),
                    pb_utils.Tensor("token_ids", np.array([out.token_ids], dtype=np.int64)),
                    pb_utils.Tensor("finish_reason", np.array([[(out.finish_reason or "").encode()]], dtype=np.object_)),
                    pb_utils.Tensor("prompt_tokens", prompt_tokens),
                ]
            )
            sender.send(response, flags=FINAL if out.finish_reason else 0)

        return Sequence(
            request_id=request.request_id() or uuid.uuid4().hex,
            prompt=prompt,
            prompt_len=len(ids),
            rope_delta=int(one_request_input(request, "rope_delta", np.int64, ndim=1)[0]),
            params=params,
            emit=self.streamer.emitter(send),
            is_cancelled=sender.is_cancelled,
            tier_name=parameters.get("tier"),
        )

    def finalize(self):
        self.metrics.stop()
        self.engine.stop()  # fails what is still queued or running: those errors go out next
        self.streamer.stop()
        if self.server_counts is not None:
            self.server_counts.close()
