"""Early-exit drafting (the model's own first blocks on the client) and the learned cost of a round."""

from __future__ import annotations

import pytest
import torch

from engine.client.early_exit import (
    EarlyExitDrafter,
    draft_block_count,
    load_early_exit_blocks,
)
from engine.client.generation import generate
from engine.client.sampling import SamplingParams
from engine.client.speculative import RoundCost, SpeculationConfig, SpeculationStats, best_draft_length
from engine.models import load_block_span, load_client_parts
from tests.unit.test_client_speculative import RollbackModel


def test_draft_block_count_is_bounded_by_bytes_and_never_the_whole_model():
    assert draft_block_count(4, num_blocks=30, block_bytes=14 << 20, max_bytes=256 << 20) == 4
    assert draft_block_count(0, num_blocks=30, block_bytes=1, max_bytes=1 << 30) == 0
    assert draft_block_count(30, num_blocks=30, block_bytes=1, max_bytes=1 << 30) == 0  # the model itself
    # A 70B model's block is ~1.7 GB in fp16: not even one fits the default budget.
    assert draft_block_count(2, num_blocks=80, block_bytes=1_700_000_000, max_bytes=256 << 20) == 0


def test_round_cost_learns_the_per_token_share_from_rounds_of_different_sizes():
    cost = RoundCost(prior=0.05, decay=0.95)
    assert cost.token_cost == 0.05  # nothing seen: the prior
    for _ in range(5):
        cost.observe(1, 0.200)
    assert cost.token_cost == pytest.approx(0.05)  # one size only: still the prior's share
    for sent in (2, 5, 1, 3) * 5:
        cost.observe(sent, 0.200 + 0.040 * (sent - 1))  # CPU servers: each token adds 40 ms to 200
    assert cost.token_cost == pytest.approx(0.2, rel=1e-3)
    cost.observe(3, 0.280, drafted=2, draft_seconds=0.100)  # a slow drafter: 50 ms a token on top
    assert cost.token_cost == pytest.approx((0.040 + 0.050) / 0.200, rel=0.05)
    # With that cost, a 12% acceptance does not pay for a draft; 80% does.
    config = SpeculationConfig()
    assert best_draft_length(0.12, config, cost.token_cost) == 0
    assert best_draft_length(0.8, config, cost.token_cost) >= 2


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint_factory("llama", num_layers=2)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf, load_client_parts(path)


def test_early_exit_with_every_block_drafts_perfectly_and_greedy_is_unchanged(tiny):
    path, hf, head = tiny
    ids = torch.tensor([[11, 42, 7, 300, 5, 99]])
    params = SamplingParams(max_new_tokens=16)
    plain = generate(RollbackModel(hf), ids, params)
    # Draft == target layers (built directly: the loader refuses the whole model): every draft is kept.
    stats = SpeculationStats()
    drafter = EarlyExitDrafter(head, load_block_span(path, 0, 2))
    config = SpeculationConfig(drafter=drafter)
    assert (
        generate(RollbackModel(hf), ids, params, speculation=config, stats=stats).tolist() == plain.tolist()
    )
    assert stats.drafted > 0 and stats.acceptance == 1.0 and stats.rounds < 16
    # One block of two: whatever it drafts, the tokens are plain greedy's.
    stats = SpeculationStats()
    drafter = EarlyExitDrafter(head, load_early_exit_blocks(path, 1))
    config = SpeculationConfig(drafter=drafter)
    assert (
        generate(RollbackModel(hf), ids, params, speculation=config, stats=stats).tolist() == plain.tolist()
    )
    assert stats.drafted > 0


def test_early_exit_drafter_reuses_its_cache_after_a_rollback(tiny):
    path, _, head = tiny
    span = load_block_span(path, 0, 1)
    kept = EarlyExitDrafter(head, span)
    history = [11, 42, 7, 300, 5]
    first, probs = kept.draft(history, 4)
    assert len(first) == 4 and probs is None
    # The servers kept two of the drafts and corrected the third: the drafter cuts its cache back.
    history = history + first[:2] + [(first[2] + 1) % 512]
    again, _ = kept.draft(history, 3)
    assert again == EarlyExitDrafter(head, span).draft(history, 3)[0]  # as if read from scratch
    assert kept.cached[: len(history)] == history
    # A history longer than the cache: it grows and still drafts what a fresh drafter does.
    long = list(range(5, 305))
    assert kept.draft(long, 2)[0] == EarlyExitDrafter(head, span).draft(long, 2)[0]


def test_early_exit_loader_refuses_the_whole_model_and_too_many_bytes(tiny):
    path, _, _ = tiny
    assert load_early_exit_blocks(path, 2) is None  # both blocks: the model itself
    assert load_early_exit_blocks(path, 1, max_bytes=10) is None
    assert load_early_exit_blocks(path, 1).num_blocks == 1
