"""Speculation with a feature drafter: the verified positions' last-block outputs reach the drafter, aligned
(checked against local transformers at every call, across rollbacks and turns); the output is unchanged.
"""

from __future__ import annotations

import pytest
import torch

from engine.client.feature_history import FeatureHistory
from engine.client.generation import generate
from engine.client.sampling import SamplingParams
from engine.client.speculative import SpeculationConfig, SpeculationStats
from tests.helpers.feature_drafters import CheckingFeatureDrafter
from tests.unit.test_client_speculative import RollbackModel, RollbackSession


class FeatureRollbackModel(RollbackModel):
    """The local rollback model, also returning the last block's outputs (before the final norm)."""

    def session_forward(self, session, input_ids, *, start_from_position=None, last=None):
        captured = []
        handle = self.hf.model.layers[-1].register_forward_hook(
            lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        try:
            logits = self.session_logits_all(
                session, input_ids, start_from_position=start_from_position, last=last
            )
        finally:
            handle.remove()
        return logits, captured[0].reshape(input_ids.shape[0], input_ids.shape[1], -1)


def test_feature_history_appends_in_place_grows_and_truncates():
    history = FeatureHistory(capacity=2)
    rows = torch.arange(12.0).reshape(6, 2)
    history.append(rows[:1])
    buffer = history.view()
    history.append(rows[1:2])
    assert history.view().data_ptr() == buffer.data_ptr()  # within capacity: no new buffer
    history.append(rows[2:5])  # grows past the capacity
    assert torch.equal(history.view(), rows[:5])
    history.truncate(3)
    history.append(rows[5:])
    assert torch.equal(history.view(), torch.cat([rows[:3], rows[5:]]))
    with pytest.raises(ValueError, match="cannot keep 9 of 4"):
        history.truncate(9)
    with pytest.raises(ValueError, match="do not extend"):
        history.append(torch.zeros(1, 3))


@pytest.mark.parametrize("wrong_every", [1, 2, 1000])
def test_a_feature_drafter_gets_the_verified_features_and_greedy_is_unchanged(hf, wrong_every):
    ids = torch.randint(5, hf.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(11))
    params = SamplingParams(max_new_tokens=20)
    plain = generate(FeatureRollbackModel(hf), ids, params)
    drafter = CheckingFeatureDrafter(hf, wrong_every=wrong_every)
    stats = SpeculationStats()
    config = SpeculationConfig(drafter=drafter, learn_cost=False, lookup_min_match=0)
    spec = generate(FeatureRollbackModel(hf), ids, params, speculation=config, stats=stats)
    assert spec.tolist() == plain.tolist()
    assert drafter.calls >= 2 and min(drafter.seen_lengths) == 8  # first called right after the prefill
    if wrong_every < 1000:
        assert 0 < stats.accepted < stats.drafted  # rollbacks happened, and each later call was checked
    else:
        assert stats.acceptance == 1.0 and stats.rounds < 10


@pytest.mark.parametrize("eos_mid_round", [False, True])
def test_feature_speculation_across_turns_of_one_session(hf, eos_mid_round):
    """A second turn in the same session: the features of the first turn's verified positions are kept,
    and every turn equals plain greedy's. With eos in the middle of a round, the servers hold draft tokens
    past the end of the first turn: the second turn (speculative or plain) rolls them back first."""
    first = torch.randint(5, hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    second = torch.randint(5, hf.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(4))
    eos = None
    if eos_mid_round:
        eos = int(generate(FeatureRollbackModel(hf), first, SamplingParams(max_new_tokens=9))[0, 6 + 2])
    params = SamplingParams(max_new_tokens=9, eos_token_id=eos)
    outputs, held_past_the_end = {}, False
    for modes in (("plain", "plain"), ("spec", "spec"), ("spec", "plain")):
        model = FeatureRollbackModel(hf)
        session = RollbackSession(max_length=40)
        drafter = CheckingFeatureDrafter(hf, wrong_every=1000 if eos_mid_round else 1)
        config = SpeculationConfig(drafter=drafter, learn_cost=False, initial_draft=6, lookup_min_match=0)
        turns = []
        for ids, mode in zip((first, second), modes, strict=True):
            speculation = config if mode == "spec" else None
            turns.append(generate(model, ids, params, session=session, speculation=speculation).tolist())
            held_past_the_end |= session.position >= session.output_ids.shape[1]
        outputs[modes] = turns
        if modes == ("spec", "spec"):
            assert max(drafter.seen_lengths) > len(turns[0][0]) + 4  # drafted in the second turn, checked
    assert outputs[("spec", "spec")] == outputs[("plain", "plain")] == outputs[("spec", "plain")]
    assert held_past_the_end == eos_mid_round  # the case this test is about did happen


def test_sampling_with_a_feature_drafters_distributions(hf):
    ids = torch.randint(5, hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(8))
    params = SamplingParams(max_new_tokens=16, do_sample=True, temperature=0.9, seed=5)
    runs = []
    for _ in range(2):
        drafter = CheckingFeatureDrafter(hf, sampled=True, seed=1)
        stats = SpeculationStats()
        config = SpeculationConfig(drafter=drafter, learn_cost=False, lookup_min_match=0)
        runs.append(generate(FeatureRollbackModel(hf), ids, params, speculation=config, stats=stats))
        assert stats.drafted > 0 and stats.tokens == 16
    assert runs[0].tolist() == runs[1].tolist() and runs[0].shape == (1, 22)


def test_a_model_without_hidden_states_is_refused_for_a_feature_drafter(hf):
    ids = torch.tensor([[5, 6, 7]])
    config = SpeculationConfig(drafter=CheckingFeatureDrafter(hf))
    with pytest.raises(TypeError, match="returns no hidden states: a feature drafter needs them"):
        generate(RollbackModel(hf), ids, SamplingParams(max_new_tokens=3), speculation=config)


class WrongFeatureDrafter(CheckingFeatureDrafter):
    """Checks its features, then drafts only wrong tokens (and counts them)."""

    drafted = 0

    def draft_with_features(self, tokens, features, k):
        draft, _ = super().draft_with_features(tokens, features, k)
        self.drafted += len(draft)
        return [(t + 1) % self.hf.config.vocab_size for t in draft], None


@pytest.mark.parametrize("lookup_min_match", [0, 2])
def test_long_prompt_lookup_matches_stand_in_for_the_feature_drafter(hf, lookup_min_match):
    ids = torch.tensor([[11, 12, 13, 14, 15, 16, 11, 12, 13, 14, 15, 16, 11, 12]])
    params = SamplingParams(max_new_tokens=24)
    plain = generate(FeatureRollbackModel(hf), ids, params)
    drafter = WrongFeatureDrafter(hf)
    stats = SpeculationStats()
    config = SpeculationConfig(drafter=drafter, learn_cost=False, lookup_min_match=lookup_min_match)
    assert generate(FeatureRollbackModel(hf), ids, params, speculation=config, stats=stats).tolist() == (
        plain.tolist()
    )
    assert stats.drafter == "feature" and drafter.calls > 0
    if lookup_min_match:
        assert stats.drafted > drafter.drafted and stats.accepted > 0  # copies went out, and some were kept
    else:
        assert stats.drafted == drafter.drafted and stats.accepted == 0
