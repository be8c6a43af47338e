"""The decoder engine's parts on their own: sampling settings, slots, scheduler, detokenizer,
and the engine loop on the tiny model (no server)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from model_repository.qwen3vl_runtime.engine import Engine, FinishReason, SamplingParams, Sequence
from model_repository.qwen3vl_runtime.engine.detokenizer import IncrementalDetokenizer
from model_repository.qwen3vl_runtime.engine.phase_clock import PhaseClock
from model_repository.qwen3vl_runtime.engine.runner import ModelRunner, PromptInputs
from model_repository.qwen3vl_runtime.engine.scheduler import UNLIMITED, QueueFull, Scheduler
from model_repository.qwen3vl_runtime.engine.slots import SlotPool
from model_repository.qwen3vl_runtime.engine.step_log import StepLog
from model_repository.qwen3vl_runtime.tiers import DEFAULT_TIERS, Tier, TierTable

from .conftest import FakeClock

DEFAULTS = SamplingParams(max_tokens=16)


def test_sampling_params_from_request_parameters():
    params = SamplingParams.from_parameters(
        {
            "max_tokens": "7",
            "temperature": 0.5,
            "top_p": "0.9",
            "top_k": 20,
            "seed": 3,
            "stop": '["a", "bc"]',
            "ignore_eos": "true",
            "tier": "vip",
        },
        DEFAULTS,
    )
    assert params == SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=20, seed=3, stop=("a", "bc"), ignore_eos=True
    )
    assert SamplingParams.from_parameters({"stop": "END"}, DEFAULTS).stop == ("END",)
    assert SamplingParams.from_parameters({}, DEFAULTS) == DEFAULTS


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer"),
        ({"max_tokens": "many"}, "max_tokens must be an integer"),
        ({"max_tokens": True}, "max_tokens must be a number"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0}, "top_p must be in"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"stop": "[1]"}, "stop must be a list of non-empty strings"),
        ({"stop": "[oops"}, "stop must be a string or a JSON list"),
        ({"ignore_eos": "maybe"}, "ignore_eos must be true or false"),
    ],
)
def test_sampling_params_reject_bad_values(parameters, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_parameters(parameters, DEFAULTS)


def test_slot_pool():
    pool = SlotPool(2)
    a, b = pool.allocate(), pool.allocate()
    assert {a, b} == {0, 1} and not pool.can_allocate()
    pool.free(a)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(a)
    assert pool.allocate() == a


def _seq(name: str, emit=lambda out: None, tier=UNLIMITED.get(None), **kwargs) -> Sequence:
    seq = Sequence(name, prompt=None, prompt_len=4, rope_delta=0, params=DEFAULTS, emit=emit, **kwargs)
    seq.tier = tier
    return seq


def _queued(scheduler) -> list[str]:
    return [s.request_id for q in scheduler.waiting.values() for s in q]


def test_scheduler_admits_while_slots_last_and_retire_frees_them():
    scheduler = Scheduler(SlotPool(2))
    seqs = [_seq(str(i)) for i in range(3)]
    for s in seqs:
        scheduler.add(s)
    assert scheduler.admit() == seqs[:2] and _queued(scheduler) == ["2"]
    scheduler.retire(seqs[0])
    assert seqs[0].slot is None and seqs[0].finished
    assert scheduler.admit() == [seqs[2]] and scheduler.running == [seqs[1], seqs[2]]


def test_scheduler_bounds_prefill_tokens_per_step():
    scheduler = Scheduler(SlotPool(8), prefill_token_budget=10)  # prompts of 4 tokens: two fit
    for i in range(5):
        scheduler.add(_seq(str(i)))
    assert len(scheduler.admit()) == 2 and len(scheduler.admit()) == 2 and len(scheduler.admit()) == 1
    big = Scheduler(SlotPool(8), prefill_token_budget=2)  # one prompt over budget still runs alone
    big.add(_seq("big"))
    assert len(big.admit()) == 1



def test_newcomers_wait_for_company_only_while_many_streams_decode():
    """prefill_hold_s: held while 16+ streams decode, until the oldest has waited that long or
    the queue fills the prefill budget or the free slots; never below 16 streams."""
    from model_repository.qwen3vl_runtime.engine.scheduler import HOLD_MIN_DECODING

    now = [0.0]
    scheduler = Scheduler(SlotPool(40), prefill_token_budget=16, clock=lambda: now[0], prefill_hold_s=0.02)
    scheduler.add(_seq("a"))
    assert scheduler.admit(decoding=HOLD_MIN_DECODING - 1) != []  # few streams: at once
    scheduler.add(_seq("b"))
    now[0] = 0.01
    scheduler.add(_seq("c"))
    assert scheduler.admit(decoding=HOLD_MIN_DECODING) == []  # 10 ms: held
    now[0] = 0.02
    assert [s.request_id for s in scheduler.admit(decoding=64)] == ["b", "c"]  # b waited 20 ms
    for name in "defg":  # 4 x 4 tokens fill the budget of 16: no reason to wait
        scheduler.add(_seq(name))
    assert len(scheduler.admit(decoding=64)) == 4
    few_slots = Scheduler(SlotPool(2), clock=lambda: now[0], prefill_hold_s=0.02)
    few_slots.add(_seq("x"))
    few_slots.add(_seq("y"))
    assert len(few_slots.admit(decoding=64)) == 2  # they fill the free slots
    unheld = Scheduler(SlotPool(8), clock=lambda: now[0])
    unheld.add(_seq("z"))
    assert len(unheld.admit(decoding=64)) == 1  # the default holds nothing


def test_tiers_admit_highest_priority_first_within_caps():
    scheduler = Scheduler(SlotPool(8), DEFAULT_TIERS)
    vip, standard, free = (DEFAULT_TIERS.get(n) for n in ("vip", "standard", "free"))
    for i in range(3):
        scheduler.add(_seq(f"free{i}", tier=free))
    for i in range(6):
        scheduler.add(_seq(f"vip{i}", tier=vip))
    scheduler.add(_seq("std0", tier=standard))
    admitted = [s.request_id for s in scheduler.admit()]
    # VIP up to its cap of 4, then standard, then one free (cap 1): 6 of the 8 slots.
    assert admitted == ["vip0", "vip1", "vip2", "vip3", "std0", "free0"]
    assert scheduler.admit() == []  # caps hold although slots are free
    scheduler.retire(scheduler.running[0])  # a VIP finishes: the next VIP goes first
    assert [s.request_id for s in scheduler.admit()] == ["vip4"]


def test_caps_hold_across_the_engines_of_one_server(tmp_path):
    """Two engines (as with --gpus 0,1) share the tier caps through one counts file; an engine
    whose process is gone holds nothing."""
    import subprocess
    import sys

    from model_repository.qwen3vl_runtime.engine.server_caps import ServerTierCounts

    names = [t.name for t in DEFAULT_TIERS.tiers]
    path = tmp_path / "counts"
    first = Scheduler(SlotPool(8), DEFAULT_TIERS, server=ServerTierCounts(path, names))
    second = Scheduler(SlotPool(8), DEFAULT_TIERS, server=ServerTierCounts(path, names))
    vip = DEFAULT_TIERS.get("vip")
    for i in range(3):
        first.add(_seq(f"a{i}", tier=vip))
        second.add(_seq(f"b{i}", tier=vip))
    assert [s.request_id for s in first.admit()] == ["a0", "a1", "a2"]
    assert [s.request_id for s in second.admit()] == ["b0"]  # VIP's cap of 4 is the server's
    first.retire(first.running[0])
    assert [s.request_id for s in second.admit()] == ["b1"]
    assert first.admit() == []

    # A third engine that ran two VIP requests and died: its row no longer counts.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    third = ServerTierCounts(path, names)
    third.publish({"vip": 2, "standard": 0, "free": 0})
    third._rows[third.row, 0] = int(dead.stdout)
    second.retire(second.running[0])
    assert [s.request_id for s in second.admit()] == ["b2"]
    for counts in (third, first.server, second.server):
        counts.close()
    assert not path.exists()  # the last engine to leave removes the file


def test_slots_short_go_to_the_highest_tier():
    scheduler = Scheduler(SlotPool(2), DEFAULT_TIERS)
    scheduler.add(_seq("free0", tier=DEFAULT_TIERS.get("free")))
    scheduler.add(_seq("vip0", tier=DEFAULT_TIERS.get("vip")))
    scheduler.add(_seq("vip1", tier=DEFAULT_TIERS.get("vip")))
    assert [s.request_id for s in scheduler.admit()] == ["vip0", "vip1"]
    assert _queued(scheduler) == ["free0"]


def test_queue_timeout_and_queue_cap_per_tier():
    clock = FakeClock()
    tiers = TierTable((Tier("only", 1, max_concurrent=1, queue_timeout_s=2.0, max_queue=2, max_tokens=64),), "only")
    scheduler = Scheduler(SlotPool(1), tiers, clock=clock)
    only = tiers.get(None)
    scheduler.add(_seq("a", tier=only))
    assert scheduler.admit()[0].request_id == "a"
    scheduler.add(_seq("b", tier=only))
    clock.now = 1.0
    scheduler.add(_seq("c", tier=only))
    with pytest.raises(QueueFull, match="the only tier's queue is full \\(2 waiting\\)"):
        scheduler.add(_seq("d", tier=only))
    clock.now = 2.5  # b waited 2.5 s (> 2), c 1.5 s
    assert [s.request_id for s in scheduler.expired()] == ["b"] and _queued(scheduler) == ["c"]


def test_tier_table_validation_and_lookup():
    assert DEFAULT_TIERS.get(None).name == "standard" and DEFAULT_TIERS.get("vip").priority == 1
    with pytest.raises(ValueError, match="unknown tier 'gold'; this server has vip, standard, free"):
        DEFAULT_TIERS.get("gold")
    with pytest.raises(ValueError, match="priorities must be 1..2"):
        TierTable((Tier("a", 1, 1, 1.0, 1, 1), Tier("b", 3, 1, 1.0, 1, 1)), "a")
    with pytest.raises(ValueError, match="max_concurrent must be >= 1"):
        Tier("a", 1, 0, 1.0, 1, 1)
    assert TierTable.from_json(DEFAULT_TIERS.to_json()) == DEFAULT_TIERS


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def _feed(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], bool]:
    chunks = []
    for token in ids:
        text, stopped = detok.add(token)
        chunks.append(text)
        if stopped:
            return chunks, True
    chunks.append(detok.flush())
    return chunks, False


def test_detokenizer_streams_exactly_the_decoded_text(tokenizer):
    text = "Hello 世界! Ünïcödé and emoji 🎉 split across byte tokens."
    ids = tokenizer(text)["input_ids"]
    chunks, stopped = _feed(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(chunks) == text and not stopped
    assert not any("\ufffd" in c for c in chunks)


def test_detokenizer_streams_what_decode_gives_for_any_ids(tokenizer):
    """Random ids over the whole vocabulary, special and added tokens included: the streamed text
    is the sequence's decode (specials skipped); a partial UTF-8 character is never sent."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(tokenizer), 3000).tolist()
    chunks, stopped = _feed(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True) and not stopped


def test_detokenizer_stop_string_across_tokens_is_cut_and_never_sent(tokenizer):
    ids = tokenizer("alpha beta gamma delta")["input_ids"]
    chunks, stopped = _feed(IncrementalDetokenizer(tokenizer, stop=("a gam",)), ids)
    assert stopped and "".join(chunks) == "alpha bet"


def test_detokenizer_cuts_at_the_first_stop_string_wherever_it_falls(tokenizer):
    """Stop strings drawn from the text itself (so they straddle token borders anywhere), and ones
    that share only prefixes with it: the stream ends exactly before the first occurrence, and
    text that could still become a stop is held back, never sent and then retracted."""
    rng = np.random.default_rng(1)
    text = "The cat sat on the mat; the cat, the hat. 猫が座った。 Done: ok ok ok!"
    ids = tokenizer(text)["input_ids"]
    for _ in range(40):
        start = int(rng.integers(0, len(text) - 4))
        stop = text[start : start + int(rng.integers(2, 8))]
        chunks, stopped = _feed(IncrementalDetokenizer(tokenizer, stop=(stop + "☃", stop)), ids)
        assert stopped and "".join(chunks) == text[: text.find(stop)], stop
    chunks, stopped = _feed(IncrementalDetokenizer(tokenizer, stop=("the cat!", "ok ok ok?")), ids)
    assert not stopped and "".join(chunks) == text


@pytest.fixture(scope="module")
def engine_parts(tiny_checkpoint, tokenizer, tmp_path_factory):
    from builder.decoder_export import write_decoder
    from model_repository.qwen3vl_runtime.decoder_weights import load_text_model

    folder = tmp_path_factory.mktemp("decoder")
    write_decoder(tiny_checkpoint, folder, quantization="none", dtype="float32")
    return load_text_model(folder), tokenizer


def _run(engine_parts, requests: list[tuple[list[int], SamplingParams]], *, slots: int, max_len: int = 64, cancel=None, quantized_kv=False):
    model, tokenizer = engine_parts
    runner = ModelRunner(model, num_slots=slots, max_len=max_len, image_token_id=151655, quantized_kv=quantized_kv)
    # The watcher asks every millisecond: a cancellation is seen within a step or two.
    engine = Engine(runner, tokenizer, eos_token_ids={151645}, num_slots=slots, cancel_check_interval_s=0.001).start()
    outputs = {i: [] for i in range(len(requests))}
    finished, all_done = set(), threading.Event()

    def emit(i, out):  # on the engine thread
        outputs[i].append(out)
        if out.finish_reason or out.error:
            finished.add(i)
            if len(finished) == len(requests):
                all_done.set()

    try:
        for i, (ids, params) in enumerate(requests):
            ids_t = torch.tensor(ids)
            prompt = PromptInputs(ids_t, torch.arange(len(ids)).expand(3, -1))
            is_cancelled = (lambda i=i: cancel(i, outputs[i])) if cancel else (lambda: False)
            engine.submit(
                Sequence(str(i), prompt, len(ids), 0, params, lambda out, i=i: emit(i, out), is_cancelled=is_cancelled)
            )
        assert all_done.wait(60), "the engine did not finish every request"
        return outputs, engine
    finally:
        engine.stop()


def test_more_requests_than_slots_wait_and_all_finish(engine_parts):
    requests = [([100 + i, 200, 300], SamplingParams(max_tokens=5)) for i in range(5)]
    outputs, engine = _run(engine_parts, requests, slots=2)
    for out in outputs.values():
        assert sum(len(o.token_ids) for o in out) == 5 and out[-1].finish_reason == FinishReason.LENGTH
    assert engine.scheduler.slots.num_free == 2


@pytest.mark.parametrize("quantized_kv", [False, True], ids=["model-dtype-cache", "int8-cache"])
def test_answers_do_not_depend_on_batching(engine_parts, quantized_kv):
    requests = [([100 + i, 200 + 3 * i, 300], SamplingParams(max_tokens=6)) for i in range(4)]
    together, _ = _run(engine_parts, requests, slots=4, quantized_kv=quantized_kv)
    for i, request in enumerate(requests):
        alone, _ = _run(engine_parts, [request], slots=1, quantized_kv=quantized_kv)
        assert [t for o in alone[0] for t in o.token_ids] == [t for o in together[i] for t in o.token_ids]


def test_cancelled_request_frees_its_slot(engine_parts):
    requests = [([101, 202], SamplingParams(max_tokens=40)), ([103, 204], SamplingParams(max_tokens=3))]
    outputs, engine = _run(engine_parts, requests, slots=2, cancel=lambda i, out: i == 0 and len(out) >= 2)
    # cancelled once it has two outputs, seen by the watcher's next ask: before its 40 tokens
    assert outputs[0][-1].finish_reason == FinishReason.CANCELLED and 3 <= len(outputs[0]) < 40
    assert outputs[1][-1].finish_reason == FinishReason.LENGTH
    assert engine.scheduler.slots.num_free == 2


def test_generation_stops_at_the_context_end(engine_parts):
    outputs, _ = _run(engine_parts, [(list(range(100, 160)), SamplingParams(max_tokens=50))], slots=1, max_len=64)
    assert outputs[0][-1].finish_reason == FinishReason.LENGTH
    assert sum(len(o.token_ids) for o in outputs[0]) == 64 - 60


def test_prompt_that_fills_the_context_is_refused(engine_parts):
    model, tokenizer = engine_parts
    engine = Engine(ModelRunner(model, num_slots=1, max_len=8, image_token_id=151655), tokenizer, eos_token_ids=set(), num_slots=1)
    with pytest.raises(ValueError, match="the prompt is 8 tokens; this server's max context is 8"):
        engine.submit(Sequence("x", None, 8, 0, DEFAULTS, lambda out: None))


@pytest.mark.parametrize("rope_delta", [1, -8])
def test_rope_delta_the_preprocess_cannot_produce_is_refused(engine_parts, rope_delta):
    model, tokenizer = engine_parts
    engine = Engine(ModelRunner(model, num_slots=1, max_len=64, image_token_id=151655), tokenizer, eos_token_ids=set(), num_slots=1)
    with pytest.raises(ValueError, match=rf"rope_delta {rope_delta} is outside \[-7, 0\] for a 8-token prompt"):
        engine.submit(Sequence("x", None, 8, rope_delta, DEFAULTS, lambda out: None))


def test_engine_serves_queued_vip_before_free_within_caps_and_times_out(engine_parts):
    """Stepped by hand with a fake clock: nothing depends on timing."""
    model, tokenizer = engine_parts
    clock = FakeClock()
    tiers = TierTable(
        (
            Tier("vip", 1, max_concurrent=2, queue_timeout_s=1.0, max_queue=8, max_tokens=64),
            Tier("free", 2, max_concurrent=1, queue_timeout_s=3.0, max_queue=8, max_tokens=64),
        ),
        default="free",
    )
    runner = ModelRunner(model, num_slots=2, max_len=64, image_token_id=151655)
    engine = Engine(runner, tokenizer, eos_token_ids=set(), num_slots=2, tiers=tiers, clock=clock)
    first_token, finished = [], {}

    def emit(name, out):
        if not any(n == name for n in first_token) and out.token_ids:
            first_token.append(name)
        if out.finish_reason or out.error:
            finished[name] = out

    def submit(name, tier, max_tokens=3):
        ids = torch.tensor([100 + len(finished), 200, 300])
        prompt = PromptInputs(ids, torch.arange(3).expand(3, -1))
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        engine.submit(Sequence(name, prompt, 3, 0, params, lambda out: emit(name, out), tier_name=tier))

    for name in ("free0", "free1"):
        submit(name, "free")
    for name in ("vip0", "vip1", "vip2"):
        submit(name, "vip")
    with pytest.raises(ValueError, match="unknown tier 'gold'"):
        submit("gold0", "gold")
    with pytest.raises(ValueError, match="max_tokens 100 is over the vip tier's limit of 64"):
        submit("vip9", "vip", max_tokens=100)
    steps = 0
    while "vip2" not in finished:
        engine.step()
        steps += 1
        assert engine.scheduler.running_by_tier["vip"] <= 2 and engine.scheduler.running_by_tier["free"] <= 1
    # Every queued VIP started before any queued Free request, though the Free ones came first.
    assert first_token[:3] == ["vip0", "vip1", "vip2"]
    clock.now = 3.5  # free1 has waited past the free tier's 3 s queue timeout
    while len(finished) < 5:
        engine.step()
    assert finished["free0"].finish_reason == "length"
    assert finished["free1"].error.startswith("timed out: waited 3.50 s in the free queue (limit 3 s)")
    counters = engine.metrics.snapshot()
    assert counters["vip"].requests == 3 and counters["vip"].rejected == 1 and counters["free"].timed_out == 1
    assert counters["vip"].tokens == 9 and counters["vip"].ttft_count == 3


def test_phase_clock_tells_the_threads_work_from_its_waiting():
    """A phase asleep (as a thread waiting for the GIL is) has wall time and almost no CPU time;
    a busy one has both."""
    import time

    clock = PhaseClock()
    time.sleep(0.05)
    clock.lap("asleep")
    end = time.perf_counter() + 0.05
    while time.perf_counter() < end:
        pass
    clock.lap("busy")
    clock.lap("asleep")  # laps of one name add up
    assert clock.wall["asleep"] >= 0.05 and clock.cpu["asleep"] < 0.01
    assert clock.wall["busy"] >= 0.05 and clock.cpu["busy"] > 0.5 * clock.wall["busy"]


def test_step_log_has_a_line_per_step_with_rows_prefills_and_their_waits(engine_parts, tmp_path):
    """Three prompts for two slots, submitted at t=0 and first stepped at t=0.25 (a fake clock)."""
    import json

    model, tokenizer = engine_parts
    clock = FakeClock()
    runner = ModelRunner(model, num_slots=2, max_len=64, image_token_id=151655)
    engine = Engine(runner, tokenizer, eos_token_ids=set(), num_slots=2, clock=clock, step_log=StepLog(tmp_path / "steps.jsonl"))
    done = []
    for i in range(3):
        prompt = PromptInputs(torch.tensor([100 + i, 200, 300]), torch.arange(3).expand(3, -1))
        params = SamplingParams(max_tokens=2, ignore_eos=True)
        engine.submit(Sequence(str(i), prompt, 3, 0, params, lambda out: done.append(out) if out.finish_reason else None))
    clock.now = 0.25
    steps = 0
    while len(done) < 3:
        engine.step()
        steps += 1
    engine.step_log.close()  # stop() would too, on a started engine
    lines = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert len(lines) == steps
    first = lines[0]
    assert (first["prefilled"], first["prefill_waits_ms"], first["waiting"], first["decoded"]) == (2, [250.0, 250.0], 1, 0)
    assert {"schedule", "prefill", "wait", "output"} <= set(first["ms"])
    # the engine thread's CPU time per phase, never more than the phase's wall time (rounding aside)
    assert set(first["cpu_ms"]) == set(first["ms"]) and all(0 <= first["cpu_ms"][name] <= wall + 0.01 for name, wall in first["ms"].items())
    assert sum(line["prefilled"] for line in lines) == 3 and max(line["decoded"] for line in lines) == 2


def test_cancellation_is_asked_off_the_loop_and_ends_the_sequence_at_the_next_step(engine_parts):
    """Each is_cancelled is an IPC round trip under Triton: the engine's steps never ask; its
    watcher asks every live sequence once per poll (a thread, on an interval), and a sequence it
    found cancelled is finished (its slot freed) at the next step. Finished ones are not asked."""
    model, tokenizer = engine_parts
    runner = ModelRunner(model, num_slots=2, max_len=64, image_token_id=151655)
    engine = Engine(runner, tokenizer, eos_token_ids=set(), num_slots=2, clock=FakeClock())
    asked, cancelled, outputs = [], {"a": False, "b": False}, {"a": [], "b": []}

    def sequence(name, max_tokens):
        prompt = PromptInputs(torch.tensor([100, 200, 300]), torch.arange(3).expand(3, -1))
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        return Sequence(name, prompt, 3, 0, params, outputs[name].append, is_cancelled=lambda: asked.append(name) or cancelled[name])

    engine.submit(sequence("a", 40))
    engine.submit(sequence("b", 2))
    for _ in range(4):
        engine.step()
    assert asked == [] and outputs["b"][-1].finish_reason == FinishReason.LENGTH
    engine.watcher.poll()
    assert asked == ["a"]  # b finished: not asked
    cancelled["a"] = True
    engine.watcher.poll()
    assert outputs["a"][-1].finish_reason is None  # flagged: ends at the next step
    engine.step()
    assert asked == ["a", "a"] and outputs["a"][-1].finish_reason == FinishReason.CANCELLED
    assert engine.scheduler.slots.num_free == 2
    engine.watcher.poll()
    assert asked == ["a", "a"]  # no longer live


def test_cancel_by_request_id_ends_a_running_sequence_and_one_not_yet_seen(engine_parts):
    """Engine.cancel names a request: running, it ends at the next step; not yet submitted (the
    cancel overtook it), it ends when it arrives."""
    model, tokenizer = engine_parts
    runner = ModelRunner(model, num_slots=2, max_len=64, image_token_id=151655)
    engine = Engine(runner, tokenizer, eos_token_ids=set(), num_slots=2, clock=FakeClock())
    outputs = {"a": [], "b": []}
    params = SamplingParams(max_tokens=40, ignore_eos=True)

    def submit(name):
        prompt = PromptInputs(torch.tensor([100, 200, 300]), torch.arange(3).expand(3, -1))
        engine.submit(Sequence(name, prompt, 3, 0, params, outputs[name].append))

    submit("a")
    engine.step()  # launches a's prefill
    engine.step()  # launches a's first decode, streams the prefill's token
    engine.cancel("a")
    engine.cancel("b")
    engine.step()  # a ends before the token in flight is read: that one is dropped
    assert outputs["a"][-1].finish_reason == FinishReason.CANCELLED and len(outputs["a"]) == 2
    submit("b")
    engine.step()
    assert [o.finish_reason for o in outputs["b"]] == [FinishReason.CANCELLED]
    assert engine.scheduler.slots.num_free == 2
    assert engine.metrics.snapshot()["default"].cancelled == 2


def test_prefill_beside_decoding_joins_when_ready_and_changes_no_answer(engine_parts, monkeypatch):
    """With others decoding, newcomers' prefill is launched beside the decode steps
    (``prefill_stream``): until its tokens are ready its sequences do not decode and no other
    prefill starts; then they join. On the CPU every launch is done at once, so "not ready yet"
    (a GPU still computing it) is played by patching ``TokensToHost.ready``; stepped by hand."""
    from model_repository.qwen3vl_runtime.engine import engine as engine_module

    model, tokenizer = engine_parts
    busy = {"gpu": False}
    real_ready = engine_module.TokensToHost.ready
    monkeypatch.setattr(engine_module.TokensToHost, "ready", lambda self: not busy["gpu"] and real_ready(self))

    def serve(overlap: bool) -> tuple[dict[str, list[int]], list[int]]:
        runner = ModelRunner(model, num_slots=4, max_len=64, image_token_id=151655)
        engine = Engine(runner, tokenizer, eos_token_ids=set(), num_slots=4, clock=FakeClock(), overlap_prefill=overlap)
        tokens, batches = {}, []

        def submit(name: str, ids: list[int]) -> None:
            prompt = PromptInputs(torch.tensor(ids), torch.arange(len(ids)).expand(3, -1))
            tokens[name] = []
            emit = lambda out: tokens[name].extend(out.token_ids)  # noqa: E731
            engine.submit(Sequence(name, prompt, len(ids), 0, SamplingParams(max_tokens=6, ignore_eos=True), emit))

        def step() -> None:
            engine.step()
            batches.append(engine.metrics.batch_size)

        submit("a", [100, 200, 300])
        step(), step()  # a's prefill (nothing decodes: on the decode stream), a's first decode step
        submit("b", [101, 201]), submit("c", [102, 202, 302, 402])
        busy["gpu"] = True
        step()  # b and c prefilled; a decodes
        submit("d", [103, 203])
        step(), step()
        if overlap:
            assert engine._prefilling is not None and [s.request_id for s in engine._prefilling[0]] == ["b", "c"]
            assert tokens["b"] == tokens["c"] == [] and len(engine.scheduler.waiting["default"]) == 1  # d not admitted
        busy["gpu"] = False
        while engine.scheduler.has_work() or engine._in_flight or engine._prefilling:
            step()
        return tokens, batches

    beside, beside_batches = serve(overlap=True)
    inline, inline_batches = serve(overlap=False)
    assert beside == inline and all(len(t) == 6 for t in beside.values())
    assert beside_batches[2:5] == [1, 1, 1]  # only a decodes while b and c's prefill is not ready
    assert inline_batches[3:5] == [3, 4]  # on one stream b and c decode at the next step, d at the one after
