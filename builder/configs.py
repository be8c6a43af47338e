"""Triton configs as messages of Triton's own schema (``model_config_pb2``), from the spec table.

A misspelt or missing field fails here, at build time, not when the server starts.
"""

from __future__ import annotations

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from model_repository.qwen3vl_runtime import specs

from .options import BuildOptions


def _tensors(kind, table, text_hidden: int, *, ragged: bool = False) -> list:
    """Config tensors from specs.py; ragged: inputs of a batching model whose requests differ in
    shape, which the dynamic batcher may then put in one execute (each keeps its own tensors)."""
    return [
        kind(
            name=s.name,
            data_type=mc.DataType.Value(f"TYPE_{'STRING' if s.dtype == 'BYTES' else s.dtype}"),
            dims=list(s.resolved_dims(text_hidden)),
            **({"optional": True} if s.optional else {}),
            **({"allow_ragged_batch": True} if ragged else {}),
        )
        for s in table
    ]


# Requests the decoder may take in one execute (see language_model_config).
DECODER_INTAKE_BATCH = 16


def _instances(options: BuildOptions, count: int, *, on_gpu: bool) -> list:
    if options.device == "cpu" or not on_gpu:
        return [mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=count)]
    # One group per GPU: a Python model binds to args['model_instance_device_id'] itself.
    return [mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_GPU, count=count, gpus=[g]) for g in options.gpus]


def _dynamic_batching(options: BuildOptions) -> mc.ModelDynamicBatching:
    """One priority queue per tier on every step (an ensemble's priority is clamped per composing
    model), each rejecting requests that wait past the tier's timeout or find it full.

    The steps before the decoder have max_batch_size 0: their tensors are ragged (patches and
    tokens per request) and Triton hands them one request per execute, taken from the queues in
    priority order. The decoder batches inside its engine; it takes up to DECODER_INTAKE_BATCH
    requests per execute (``language_model_config``). It drains its queue at once, so its engine
    enforces the tiers again (qwen3vl_runtime.engine.scheduler).
    """
    table = options.tier_table
    return mc.ModelDynamicBatching(
        priority_levels=len(table.tiers),
        default_priority_level=table.get(None).priority,
        priority_queue_policy={
            tier.priority: mc.ModelQueuePolicy(
                timeout_action=mc.ModelQueuePolicy.REJECT,
                default_timeout_microseconds=int(tier.queue_timeout_s * 1e6),
                max_queue_size=tier.max_queue,
            )
            for tier in table.tiers
        },
    )


def _parameters(values: dict) -> dict:
    return {key: mc.ModelParameter(string_value=str(value)) for key, value in values.items()}


def preprocess_config(options: BuildOptions) -> mc.ModelConfig:
    return mc.ModelConfig(
        name=specs.PREPROCESS,
        backend="python",
        max_batch_size=0,
        input=_tensors(mc.ModelInput, specs.PREPROCESS_INPUTS, 0),
        output=_tensors(mc.ModelOutput, specs.preprocess_outputs(options.vision_backend == "decoder"), 0),
        instance_group=_instances(options, options.preprocess_instances, on_gpu=False),
        dynamic_batching=_dynamic_batching(options),
        parameters=_parameters(
            {
                "max_context": options.max_context,
                "max_pixels": options.max_pixels,
                "min_pixels": options.min_pixels,
                "max_images": options.max_images,
                "max_source_pixels": options.max_source_pixels,
            }
        ),
    )


def vision_config(options: BuildOptions, text_hidden: int) -> mc.ModelConfig:
    config = mc.ModelConfig(
        name=specs.VISION,
        max_batch_size=0,
        input=_tensors(mc.ModelInput, specs.VISION_INPUTS, text_hidden),
        output=_tensors(mc.ModelOutput, specs.VISION_OUTPUTS, text_hidden),
        instance_group=_instances(options, options.vision_instances, on_gpu=True),
        dynamic_batching=_dynamic_batching(options),
    )
    if options.vision_backend == "onnxruntime":
        config.backend = "onnxruntime"
        config.default_model_filename = "model.onnx"
    else:
        config.backend = "python"
    return config


def _language_model_inputs(options: BuildOptions) -> tuple:
    """The decoder takes the vision model's outputs, or the images' patch bytes when it runs the
    vision tower itself."""
    vision = specs.DECODER_VISION_INPUTS if options.vision_backend == "decoder" else specs.VISION_OUTPUTS
    return specs.PROMPT_INPUTS + vision


def language_model_config(options: BuildOptions, text_hidden: int) -> mc.ModelConfig:
    """The decoupled decoder. Its single instance takes requests one execute at a time; with
    max_batch_size 0 that is one request each, and a burst queued behind them. In run 16 (H200,
    int8, 64 streams arriving together) an execute took 3.7 ms, and a request queued 125 ms for
    the decoder (docs/benchmarks.md). With a batch size, Triton hands over what has queued in one
    execute; every tensor then carries a leading dimension of 1 per request (the ensemble adds it
    and strips it from the outputs), and no tensors are concatenated."""
    return mc.ModelConfig(
        name=specs.LANGUAGE_MODEL,
        backend="python",
        max_batch_size=DECODER_INTAKE_BATCH,
        input=_tensors(mc.ModelInput, _language_model_inputs(options), text_hidden, ragged=True),
        output=_tensors(mc.ModelOutput, specs.LANGUAGE_MODEL_OUTPUTS, text_hidden),
        # One engine per GPU batches every request itself (one copy of the weights).
        instance_group=_instances(options, 1, on_gpu=True),
        dynamic_batching=_dynamic_batching(options),
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        parameters=_parameters(
            {
                "max_context": options.max_context,
                "kv_cache_slots": options.kv_cache_slots,
                "kv_cache_dtype": options.kv_cache_dtype,
                "default_max_tokens": options.default_max_tokens,
                "dtype": options.dtype,
                "graphed_prefill": options.graphed_prefill,
                "prefill_hold_ms": options.prefill_hold_ms,
                # The tower's graphs at start: the sizes, and the resize that turns them into patch grids.
                "vision_graph_sizes": options.vision_graph_sizes,
                "min_pixels": options.min_pixels,
                "max_pixels": options.max_pixels,
                "tiers": options.tier_table.to_json(),
            }
        ),
    )


def ensemble_config(options: BuildOptions) -> mc.ModelConfig:
    """The single endpoint: preprocess -> vision_encoder -> language_model (streaming), or
    preprocess -> language_model when the decoder runs the vision tower."""

    def step(model: str, inputs, outputs) -> mc.ModelEnsembling.Step:
        return mc.ModelEnsembling.Step(
            model_name=model,
            model_version=-1,
            input_map={s.name: s.name for s in inputs},
            output_map={s.name: s.name for s in outputs},
        )

    return mc.ModelConfig(
        name=specs.ENSEMBLE,
        platform="ensemble",
        max_batch_size=0,
        input=_tensors(mc.ModelInput, specs.ENDPOINT_INPUTS, -1),
        output=_tensors(mc.ModelOutput, specs.ENDPOINT_OUTPUTS, -1),
        ensemble_scheduling=mc.ModelEnsembling(
            step=[
                step(specs.PREPROCESS, specs.PREPROCESS_INPUTS, specs.preprocess_outputs(options.vision_backend == "decoder")),
                *([] if options.vision_backend == "decoder" else [step(specs.VISION, specs.VISION_INPUTS, specs.VISION_OUTPUTS)]),
                step(specs.LANGUAGE_MODEL, _language_model_inputs(options), specs.LANGUAGE_MODEL_OUTPUTS),
            ]
        ),
    )


def to_pbtxt(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)
