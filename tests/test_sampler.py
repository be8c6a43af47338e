"""The engine's batched sampler against transformers' logits warpers, and its draw."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from model_repository.qwen3vl_runtime.engine.request import SamplingParams
from model_repository.qwen3vl_runtime.engine.sampler import (
    GRAPH_TOP_K,
    PADDING_ROW,
    SETTINGS,
    draw,
    filter_logits,
    filter_rows,
    graph_settings,
    graphable,
    sample,
    sample_graphed,
)

VOCAB = 1000
# Every combination the batch must keep apart: the generation config's default, temperature only,
# top-k only, top-p only, a top-k over the vocabulary, both cuts loose
ROWS = [
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.5, top_p=0.5),
    SamplingParams(temperature=1.0, top_k=2 * VOCAB, top_p=0.95),
    SamplingParams(temperature=0.9, top_k=VOCAB),
]


def transformers_filtered(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scores = TemperatureLogitsWarper(params.temperature)(None, row[None])
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return scores[0]


def bf16_logits(rows: int, seed: int = 0) -> torch.Tensor:
    """Random logits rounded through bf16 as the model's are: many exact ties near the top."""
    return (torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3).bfloat16().float()


def test_batched_filter_keeps_what_transformers_warpers_keep():
    logits = bf16_logits(len(ROWS))
    batched = filter_logits(logits, ROWS)
    for row, params in enumerate(ROWS):
        expected = transformers_filtered(logits[row], params)
        kept = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(batched[row]), kept), (row, params)
        assert torch.equal(batched[row][kept], expected[kept]), (row, params)
    # ties at the k-th logit are all kept (bf16 logits tie often): row 2 keeps at least its 5
    assert torch.isfinite(batched[2]).sum() >= 5 and torch.isfinite(batched[1]).all() and torch.isfinite(batched[5]).all()


def kept_values(row: torch.Tensor) -> list[float]:
    return sorted(row[torch.isfinite(row)].tolist())


def test_nucleus_among_the_top_k_keeps_as_many_tied_logits_as_a_sort_would():
    """Ties straddling the nucleus's edge: which of the tied logits stay is the sort's (or
    transformers') arbitrary choice, how many is not: kept values are compared as multisets. Where
    top_p times the ties is a whole number (rows 0 and 2) the count is the exact sum's; a float
    cumulative sum (transformers', the sort's) may keep one more there."""
    logits = bf16_logits(4, seed=1)
    logits[0, 100:130] = 50.0  # 30 logits tied at the top: more than top_k, all kept by top-k
    logits[1, 200:203] = 40.0  # three tied at the top, then a tie group straddling top_p
    logits[1, 300:310] = 39.0
    logits[2, :] = 0.0  # a flat row: every logit tied with the k-th
    params = [SamplingParams(temperature=1.0, top_k=20, top_p=0.5), SamplingParams(temperature=1.0, top_k=20, top_p=0.6),
              SamplingParams(temperature=1.0, top_k=20, top_p=0.3), ROWS[0]]  # fmt: skip
    batched = filter_logits(logits, params)
    for row in (1, 3):
        assert kept_values(batched[row]) == kept_values(transformers_filtered(logits[row], params[row])), row
    assert torch.isfinite(batched[0]).sum() == 15 and torch.isfinite(batched[2]).sum() == 0.3 * VOCAB
    # the same rows next to one without a top-k cut take the sort's way: the same kept values
    # (within one tie at the whole-number edges)
    sorted_way = filter_logits(torch.cat([logits, logits[:1]]), [*params, SamplingParams(temperature=1.0, top_p=0.9)])
    for row in (1, 3):
        assert kept_values(sorted_way[row]) == kept_values(batched[row]), row
    for row in (0, 2):
        assert 0 <= torch.isfinite(sorted_way[row]).sum() - torch.isfinite(batched[row]).sum() <= 1, row


def test_draw_follows_the_probabilities_and_never_picks_a_dropped_token():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]] * 4)
    edges = draw(probs, torch.tensor([0.0, 0.2499, 0.25, 1.0 - 1e-7]))
    assert edges.tolist() == [1, 1, 3, 3]
    probs = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4, 0.0])
    uniforms = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draw(probs.expand(len(uniforms), -1), uniforms), minlength=6).double() / len(uniforms)
    assert counts[1] == 0 and counts[5] == 0
    assert torch.allclose(counts, probs.double(), atol=0.005), counts


@pytest.mark.parametrize("seed", [0, 1])
def test_sample_mixes_greedy_and_seeded_rows(seed):
    logits = bf16_logits(4, seed=seed)
    params = [SamplingParams(), ROWS[0], SamplingParams(temperature=0.8, top_k=1), ROWS[3]]  # greedy, sampled, greedy (k=1), sampled

    def generators():
        return [None if p.greedy else torch.Generator().manual_seed(100 + i) for i, p in enumerate(params)]

    first, again = sample(logits, params, generators()), sample(logits, params, generators())
    assert torch.equal(first, again)  # the same seeds, the same tokens
    assert first[0] == logits[0].argmax() and first[2] == logits[2].argmax()
    for row in (1, 3):  # a sampled token is one the row's filter kept
        assert torch.isfinite(transformers_filtered(logits[row], params[row])[first[row]])


def test_the_graphed_sampler_body_samples_as_the_batched_sampler_does():
    """``sample_graphed`` (what a decode step's CUDA graph replays: every row, fixed shapes, the
    settings and uniforms from the host in one tensor) against ``sample`` on graphable rows; float32
    logits, so no ties make the two top-k orders differ. Padding rows are greedy."""
    vocab = VOCAB
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(3)) * 3
    params = [ROWS[0], SamplingParams(), ROWS[1], ROWS[2], SamplingParams(temperature=0.9, top_p=0.7, top_k=3),
              SamplingParams(temperature=0.6, top_k=GRAPH_TOP_K, top_p=0.9)]  # fmt: skip
    # a nucleus without a top-k cut, or a cut above GRAPH_TOP_K (with or without one): the eager way
    assert graphable(params) and not any(graphable([ROWS[r]]) for r in (3, 4, 5))

    def generators():
        return [None if p.greedy else torch.Generator().manual_seed(7 + i) for i, p in enumerate(params)]

    settings = graph_settings(params, generators(), len(logits), vocab)
    assert settings.shape == (8, SETTINGS) and settings[len(params):].tolist() == [list(PADDING_ROW)] * 2
    graphed = sample_graphed(logits, settings)
    assert torch.equal(graphed[: len(params)], sample(logits[: len(params)], params, generators()))
    assert torch.equal(graphed[len(params):], logits[len(params):].argmax(-1))
    # bf16 logits tie: the kept values of each graphable row are those of its own filter
    ties = bf16_logits(len(params))
    kept = filter_rows(ties, graph_settings(params, generators(), len(params), vocab), GRAPH_TOP_K, "top_k")
    for row, p in enumerate(params):
        if not p.greedy:
            assert kept_values(kept[row]) == kept_values(filter_logits(ties[row : row + 1], [p])[0]), row
