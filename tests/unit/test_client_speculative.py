"""Speculative decoding: drafters, the acceptance rule, draft length, and the loop against a local model."""

from __future__ import annotations

import pytest
import torch

from engine.client.generation import generate
from engine.client.sampling import SamplingParams
from engine.client.speculative import (
    SpeculationConfig,
    SpeculationStats,
    accept_draft,
    accept_greedy,
    best_draft_length,
    expected_tokens,
    prompt_lookup,
)

# --- drafters ---


def test_prompt_lookup_copies_what_followed_the_latest_match():
    history = [5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 5, 6, 7]
    assert prompt_lookup(history, 3) == [2, 3, 5]  # the later "5 6 7" wins
    assert prompt_lookup(history, 10) == [2, 3, 5, 6, 7]  # as much as there is
    assert prompt_lookup([1, 2, 3, 4], 3) == []  # nothing repeats
    assert prompt_lookup([4, 9, 4], 2) == [9, 4]  # a 1-gram match when longer ones fail
    assert prompt_lookup([7], 2) == []


# --- acceptance ---


def test_accept_greedy_keeps_the_agreeing_prefix_and_adds_the_models_token():
    assert accept_greedy([4, 5, 6, 7], [4, 5, 9]) == (2, 6)
    assert accept_greedy([4, 5, 6, 7], [4, 5, 6]) == (3, 7)  # all kept: a bonus token
    assert accept_greedy([4], []) == (0, 4)
    assert accept_greedy([1, 2], [3]) == (0, 1)


def _first_token_histogram(p, q, trials, seed=0, point_mass=False):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[1])
    for _ in range(trials):
        if point_mass:
            draft, draft_probs = [int(q)], None
        else:
            draft = [int(torch.multinomial(q[0], 1, generator=generator))]
            draft_probs = q
        kept, token = accept_draft(p, draft, draft_probs, generator)
        counts[draft[0] if kept else token] += 1
    return counts / trials


def test_speculative_sampling_keeps_the_target_distribution():
    # Target p and a rather different draft q over 5 tokens: the first emitted token must follow p.
    p = torch.tensor([[0.05, 0.40, 0.25, 0.20, 0.10], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.50, 0.05, 0.05, 0.30, 0.10]])
    observed = _first_token_histogram(p, q, trials=20000)
    assert torch.allclose(observed, p[0], atol=0.015), observed
    # The draft itself (q) is far from p: the test would catch a rule that just keeps the draft.
    assert (q[0] - p[0]).abs().max() > 0.3


def test_speculative_sampling_with_a_deterministic_drafter_keeps_the_target_distribution():
    p = torch.tensor([[0.1, 0.6, 0.3], [1 / 3, 1 / 3, 1 / 3]])
    for drafted in (0, 1, 2):
        observed = _first_token_histogram(p, drafted, trials=12000, seed=drafted, point_mass=True)
        assert torch.allclose(observed, p[0], atol=0.02), (drafted, observed)


def test_accept_draft_bonus_token_and_shape_check():
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert accept_draft(p, [1], None) == (1, 0)  # kept for sure, then the bonus from the last row
    with pytest.raises(ValueError, match="need 2 target distributions"):
        accept_draft(p[:1], [1], None)


# --- draft length ---


def test_draft_length_follows_the_acceptance_rate():
    config = SpeculationConfig(min_draft=1, max_draft=8, token_cost=0.05)
    assert best_draft_length(0.0, config) == 1
    assert best_draft_length(0.02, SpeculationConfig()) == 0  # drafting does not pay: plain steps
    assert best_draft_length(0.3, config) <= 2
    assert best_draft_length(0.9, config) >= 6
    assert best_draft_length(1.0, config) == 8
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    with pytest.raises(ValueError):
        SpeculationConfig(min_draft=3, initial_draft=2)


def test_draft_length_stops_drafting_when_nothing_is_accepted_and_probes():
    from engine.client.speculative import DraftLength

    length = DraftLength(SpeculationConfig(probe_every=4))
    for _ in range(10):
        length.update(drafted=length.next() or 1, accepted=0)
    assert length.k == 0
    lengths = [length.next() for _ in range(8)]
    probes = [i for i, k in enumerate(lengths) if k]
    assert set(lengths) == {0, 1} and len(probes) == 2 and probes[1] - probes[0] == 4  # every 4 rounds
    for _ in range(10):
        length.update(drafted=4, accepted=4)  # the text turned repetitive: drafts pay again
    assert length.next() == 8


def test_round_costs_in_stairs_keep_one_draft_token_where_a_line_stops_drafting():
    """CPU servers over a WAN: 2 rows cost what 1 does, 3+ rows ~15-35% more (bench/round_cost.py). A line
    through those rounds prices every extra token alike and stops drafting at 20% acceptance; each size's
    own time keeps the nearly free single draft token."""
    from engine.client.speculative import DraftLength, RoundCost

    stairs = {1: 0.181, 2: 0.184, 3: 0.209, 4: 0.216, 5: 0.235, 6: 0.241}
    cost = RoundCost(prior=0.05, decay=0.95)
    for _ in range(3):
        for rows, seconds in stairs.items():
            cost.observe(rows, seconds, drafted=rows - 1, draft_seconds=0.003 * (rows - 1))
    assert cost.relative(1) == 1.0
    assert cost.relative(2) == pytest.approx((0.184 + 0.003) / 0.181, rel=1e-6)
    assert cost.relative(5) == pytest.approx((0.235 + 4 * 0.003) / 0.181, rel=1e-6)
    assert cost.relative(9) == pytest.approx(1 + 8 * cost.token_cost)  # never seen: the line
    config = SpeculationConfig(max_draft=8, token_cost=0.05)
    line = DraftLength(config, acceptance=0.2)
    line.update(drafted=1, accepted=0, token_cost=0.2)  # the line's slope over these stairs is dear
    assert line.k == 0
    measured = DraftLength(config, acceptance=0.2)
    measured.update(drafted=1, accepted=0, token_cost=0.2, round_cost=cost.relative)
    assert measured.k == 1
    measured.update(drafted=1, accepted=1, token_cost=0.2, round_cost=cost.relative)
    measured.update(drafted=1, accepted=1, token_cost=0.2, round_cost=cost.relative)
    assert measured.k >= 2  # most drafts right: longer drafts pay even at the stair


# --- the loop, against a local transformers model with a rollback-capable cache ---


class RollbackSession:
    def __init__(self, max_length: int):
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self.position = 0
        self.max_length = max_length
        self.output_ids = None
        self.steps: list[tuple[int, int | None]] = []  # (tokens sent, start_from_position)

    def close(self):
        pass


class RollbackModel:
    session_type = RollbackSession

    def __init__(self, hf):
        self.hf = hf

    def inference_session(self, *, max_length: int):
        return self.session_type(max_length)

    def session_logits(self, session, input_ids):
        return self.session_logits_all(session, input_ids)[:, -1]

    def session_logits_all(self, session, input_ids, *, start_from_position=None, last=None):
        if start_from_position is not None:
            assert start_from_position <= session.position
            if start_from_position < session.position:
                session.cache.crop(start_from_position - session.position)  # negative: tokens to drop
            session.position = start_from_position
        assert session.position + input_ids.shape[1] <= session.max_length
        session.steps.append((input_ids.shape[1], start_from_position))
        with torch.no_grad():
            out = self.hf(input_ids=input_ids, past_key_values=session.cache, use_cache=True)
        session.position += input_ids.shape[1]
        return out.logits if last is None else out.logits[:, -last:]

    def can_roll_back(self, session):
        return True


class OracleDrafter:
    """Proposes the true continuation, with every `wrong_every`-th proposal corrupted."""

    def __init__(self, truth: list[int], prompt_length: int, wrong_every: int):
        self.truth, self.prompt_length, self.wrong_every = truth, prompt_length, wrong_every
        self.calls = 0

    def draft(self, history, k):
        self.calls += 1
        done = len(history) - self.prompt_length
        proposal = list(self.truth[done : done + k])
        if proposal and self.calls % self.wrong_every == 0:
            proposal[len(proposal) // 2] = (proposal[len(proposal) // 2] + 1) % 512
        return proposal, None


@pytest.mark.parametrize("wrong_every", [1, 2, 1000])
@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_speculation_equals_plain_greedy(hf, wrong_every, penalty):
    ids = torch.randint(5, hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))
    params = SamplingParams(max_new_tokens=20, repetition_penalty=penalty)
    plain = generate(RollbackModel(hf), ids, params)
    truth = plain[0, 6:].tolist()
    stats = SpeculationStats()
    drafter = OracleDrafter(truth, 6, wrong_every)
    model = RollbackModel(hf)
    spec = generate(model, ids, params, speculation=SpeculationConfig(drafter=drafter), stats=stats)
    assert spec.tolist() == plain.tolist()
    assert stats.tokens == 20
    if wrong_every == 1000:
        assert stats.rounds < 10 and stats.acceptance == 1.0  # most tokens came several per round
    if wrong_every == 1:
        assert stats.accepted < stats.drafted  # rollbacks happened, and the output is still the same


def test_speculation_with_prompt_lookup_on_a_repetitive_prompt(hf):
    ids = torch.tensor([[11, 12, 13, 14, 15, 11, 12, 13, 14, 15, 11, 12]])
    params = SamplingParams(max_new_tokens=16)
    plain = generate(RollbackModel(hf), ids, params)
    stats = SpeculationStats()
    spec = generate(RollbackModel(hf), ids, params, speculation=SpeculationConfig(), stats=stats)
    assert spec.tolist() == plain.tolist()
    assert stats.rounds <= 16 and stats.drafted > 0


def test_sampled_speculation_runs_and_is_reproducible(hf):
    ids = torch.tensor([[11, 12, 13, 11, 12, 13, 11]])
    params = SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=50, seed=3)
    config = SpeculationConfig()
    first = generate(RollbackModel(hf), ids, params, speculation=config)
    second = generate(RollbackModel(hf), ids, params, speculation=config)
    assert first.tolist() == second.tolist() and first.shape == (1, 19)


def test_a_local_draft_model_drafts_and_greedy_output_is_unchanged(hf, tiny_checkpoint_factory):
    from transformers import AutoModelForCausalLM

    # A different (smaller, other seed) model with the same tokenizer drafts; a copy of the target drafts
    # perfectly. Either way the output is plain greedy's.
    other = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint_factory("llama", num_layers=1, seed=3), dtype=torch.float32
    )
    ids = torch.tensor([[11, 12, 13, 14, 15, 11, 12]])
    params = SamplingParams(max_new_tokens=12)
    plain = generate(RollbackModel(hf), ids, params)
    for draft_model, perfect in ((other, False), (hf, True)):
        stats = SpeculationStats()
        # learn_cost off: here the "swarm" is a local model no dearer than the drafter, so the learned cost
        # would (rightly) stop the drafting; this test is about the drafting itself.
        config = SpeculationConfig(draft_model=draft_model, learn_cost=False)
        assert (
            generate(RollbackModel(hf), ids, params, speculation=config, stats=stats).tolist()
            == plain.tolist()
        )
        assert stats.drafted > 0
        if perfect:
            assert stats.acceptance == 1.0 and stats.rounds <= 4


class KindsDrafter:
    """Proposes the truth after even calls ("good") and wrong tokens after odd ones ("bad")."""

    def __init__(self, truth: list[int], prompt_length: int):
        self.truth, self.prompt_length, self.calls = truth, prompt_length, 0

    def propose(self, history, k):
        self.calls += 1
        done = len(history) - self.prompt_length
        proposal = list(self.truth[done : done + k])
        if self.calls % 2:
            return [(t + 1) % 512 for t in proposal], None, "bad"
        return proposal, None, "good"


def test_each_kind_of_proposal_gets_its_own_draft_length(hf):
    ids = torch.randint(5, hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    params = SamplingParams(max_new_tokens=40)
    plain = generate(RollbackModel(hf), ids, params)
    stats = SpeculationStats()
    drafter = KindsDrafter(plain[0, 6:].tolist(), 6)
    config = SpeculationConfig(drafter=drafter, learn_cost=False)
    output = generate(RollbackModel(hf), ids, params, speculation=config, stats=stats)
    assert output.tolist() == plain.tolist()
    # The bad kind soon sends nothing (a one-token probe now and then), the good one whole drafts: with one
    # draft length for both, each bad round would waste as many tokens as a good one gains.
    assert stats.acceptance > 0.6 and stats.rounds < 24
    assert stats.drafted - stats.accepted < 12


def test_a_model_drafter_does_not_delay_the_first_token(hf):
    """The prefill round goes out undrafted: a model drafter would first read the whole prompt."""
    ids = torch.randint(5, hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(9))
    params = SamplingParams(max_new_tokens=10)
    plain = generate(RollbackModel(hf), ids, params)
    seen = []

    class Recording(OracleDrafter):
        def draft(self, history, k):
            seen.append(len(history))
            return super().draft(history, k)

    drafter = Recording(plain[0, 6:].tolist(), 6, wrong_every=1000)
    config = SpeculationConfig(drafter=drafter, learn_cost=False)
    assert generate(RollbackModel(hf), ids, params, speculation=config).tolist() == plain.tolist()
    assert seen and min(seen) > 6  # first called after the prefill's token came back
