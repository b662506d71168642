"""The n-gram table of a model's own answers (engine.client.ngram_drafter): building, guessing, files, and
greedy speculation with it (output unchanged, and answers it has seen draft well)."""

import gzip
import json

import pytest
import torch

from engine.client.generation import generate
from engine.client.ngram_drafter import (
    Guess,
    NgramDrafter,
    NgramTable,
    NgramTableError,
    shipped_table_path,
)
from engine.client.sampling import SamplingParams
from engine.client.speculative import SpeculationConfig, SpeculationStats
from tests.unit.test_client_speculative import RollbackModel


def test_the_table_keeps_the_models_likeliest_choice_per_context_and_backs_off():
    # prompt [1, 2]; the answers (from position 2 on) are what "the model" said
    answers = [([1, 2, 5, 6, 7], 2), ([1, 2, 5, 6, 8], 2), ([3, 5, 6, 8], 1)]
    table = NgramTable.build(answers, vocab_size=10)
    assert table.guess([9, 5, 6]).token == 8  # after (5, 6): 8 twice, 7 once
    assert table.guess([9, 5, 6]).context == 2 and table.guess([9, 5, 6]).share == pytest.approx(2 / 3)
    assert table.guess([2, 5, 6]).token == 7 and table.guess([2, 5, 6]).context == 3  # longest context wins
    assert table.guess([9, 9, 5]).token == 6  # 1-token context
    assert table.guess([9]) is None  # never seen
    # the prompt's own tokens are context only: nothing predicts the prompt's second token
    assert table.guess([1]) is None
    assert table.meta["answer_tokens"] == 3 + 3 + 3


def test_candidates_list_the_top_followers_of_the_longest_context_then_shorter_ones():
    # after (5, 6): 8 three times, 7 twice, 9 once; after (6,) alone also 4 (from "3 6 4")
    answers = [([1, 5, 6, 8], 1)] * 3 + [([1, 5, 6, 7], 1)] * 2 + [([1, 5, 6, 9], 1), ([1, 3, 6, 4, 0], 1)]
    table = NgramTable.build(answers, vocab_size=10, top_k=4)
    found = table.candidates([2, 5, 6], 4)
    assert [(g.token, g.context) for g in found] == [(8, 2), (7, 2), (9, 2), (4, 1)]
    assert found[0].share == pytest.approx(3 / 6) and found[3].share == pytest.approx(1 / 7)
    assert [g.token for g in table.candidates([2, 5, 6], 2)] == [8, 7]
    assert table.candidates([2, 5, 6], 1)[0] == table.guess([2, 5, 6])
    assert table.candidates([0], 3) == [] and table.guess([0]) is None  # 0 ends an answer: no followers
    # contexts of up to 4 tokens; a longer known context wins over a shorter one
    long = NgramTable.build([([1, 2, 3, 4, 5], 0), ([9, 2, 3, 4, 6], 0), ([9, 2, 3, 4, 6], 0)], 10)
    assert long.max_context == 4 and long.guess([1, 2, 3, 4]) == Guess(5, 4, 1.0)
    assert [g.token for g in long.candidates([1, 2, 3, 4], 2)] == [5, 6]


def test_pruning_drops_rare_contexts_and_followers_but_keeps_each_favourite(tmp_path):
    answers = [([1, 5, 6, 8], 1)] * 3 + [([1, 5, 6, 7], 1)] * 2 + [([1, 5, 6, 9], 1), ([1, 3, 6, 4, 0], 1)]
    table = NgramTable.build(answers, vocab_size=10)
    small = table.pruned([1, 4], min_share=0.3)  # 2+ token contexts need 4 sightings; followers 30%
    assert small.entries[(5, 6)] == (((8, 3), (7, 2)), 6)  # 9 had 1 of 6
    assert (3, 6) not in small.entries and (1, 3, 6) not in small.entries  # seen once
    assert small.entries[(4,)] == (((0, 1),), 1)  # 1-token contexts: all kept, with their favourite
    small.save(tmp_path / "t.json.gz")
    assert NgramTable.load(tmp_path / "t.json.gz", 10).entries == small.entries


def test_a_table_round_trips_through_its_file_and_refuses_another_vocabulary(tmp_path):
    table = NgramTable.build([([1, 2, 3, 4, 2, 3, 5], 1)], vocab_size=10, model="m")
    path = tmp_path / "m" / "ngram.json.gz"
    table.save(path)
    again = NgramTable.load(path, vocab_size=10)
    assert again.entries == table.entries and again.meta["model"] == "m"
    with pytest.raises(NgramTableError, match="vocabulary of 10 tokens, this model has 12"):
        NgramTable.load(path, vocab_size=12)
    (tmp_path / "bad.json.gz").write_bytes(b"not gzip")
    with pytest.raises(NgramTableError, match="cannot read"):
        NgramTable.load(tmp_path / "bad.json.gz")
    old = tmp_path / "old.json.gz"  # the first format: one follower per context
    old.write_bytes(gzip.compress(json.dumps(dict(format=1, vocab_size=10, rows=[[1, 2, 3, 4]])).encode()))
    with pytest.raises(NgramTableError, match="format 1, not 2: rebuild it"):
        NgramTable.load(old)
    assert shipped_table_path("org/M-hf", root=tmp_path) == path  # hub id, "-hf", case: one name
    assert shipped_table_path("other", None, root=tmp_path) is None


def test_proposals_copy_the_conversation_first_then_chain_from_the_table():
    table = NgramTable.build([([1, 5, 6, 7, 8], 1)], vocab_size=10)
    drafter = NgramDrafter(table, lookup_min_match=2)
    tokens, probs, kind = drafter.propose([3, 4, 9, 3, 4], 3)  # (3, 4) seen before: copy what followed
    assert (tokens, probs, kind) == ([9, 3, 4], None, ("lookup", 2))
    tokens, _, kind = drafter.propose([2, 5], 3)  # chain 6, 7, 8 from the table
    assert tokens == [6, 7, 8] and kind == ("ngram", 1, True)
    assert drafter.propose([2, 9], 3) == ([], None, ("ngram", 0, False))
    # an unsure 1-token guess gives way to a 1-token copy from the conversation
    unsure = NgramTable.build([([1, 5, 6], 1), ([1, 5, 7], 1), ([1, 5, 8], 1)], vocab_size=10)
    assert NgramDrafter(unsure).propose([5, 2, 3, 5], 2) == ([2, 3], None, ("lookup", 1))
    assert NgramDrafter(unsure).propose([9, 5], 2)[2] == ("ngram", 1, False)
    # any known 2+-token context or any clear favourite goes before a 1-token copy (table_first="known")
    table = NgramTable.build([([1, 4, 5, 6], 1)] * 3 + [([1, 4, 5, 7], 1)] * 2 + [([1, 8, 6], 1)], 10)
    unsure2 = NgramTable.build([([1, 4, 5, 6], 1), ([1, 4, 5, 7], 1)], 10)
    assert NgramDrafter(unsure2).table_first == "known"
    assert NgramDrafter(unsure2).propose([5, 2, 4, 5], 1)[2] == ("ngram", 2, False)
    assert NgramDrafter(table).propose([8, 3, 8], 1) == ([6], None, ("ngram", 1, True))
    assert NgramDrafter(unsure2).propose([4, 5, 2, 4, 5], 1)[2] == ("lookup", 2)  # 2+-token copies first
    # table_first="sure" (d284824, for paired benches): only a clear favourite after 2+ tokens
    sure = dict(table_first="sure")
    assert NgramDrafter(table, **sure).propose([4, 2, 4, 5], 1) == ([6], None, ("ngram", 2, True))  # 3 of 5
    assert NgramDrafter(table, **sure).propose([8, 3, 8], 1) == ([3], None, ("lookup", 1))  # (8,): 1 token
    assert NgramDrafter(unsure2, **sure).propose([4, 5, 2, 4, 5], 1)[2] == ("lookup", 2)
    assert NgramDrafter(unsure2, **sure).propose([5, 2, 4, 5], 1) == ([2], None, ("lookup", 1))  # 1 of 2
    with pytest.raises(ValueError, match="table_first must be 'sure' or 'known'"):
        NgramDrafter(table, table_first="always")


def test_greedy_speculation_with_a_table_of_the_models_answers_equals_plain_greedy(hf):
    prompts = torch.randint(5, hf.config.vocab_size, (6, 5), generator=torch.Generator().manual_seed(3))
    params = SamplingParams(max_new_tokens=16)
    answers = []
    for row in prompts[:4]:  # the table: the model's own answers to four prompts
        out = generate(RollbackModel(hf), row[None], params)
        answers.append((out[0].tolist(), 5))
    table = NgramTable.build(answers, vocab_size=hf.config.vocab_size)
    for index, seen in ((0, True), (5, False)):
        ids = prompts[index][None]
        plain = generate(RollbackModel(hf), ids, params)
        stats = SpeculationStats()
        config = SpeculationConfig(drafter=NgramDrafter(table))
        spec = generate(RollbackModel(hf), ids, params, speculation=config, stats=stats)
        assert spec.tolist() == plain.tolist()
        assert stats.drafter == "ngram"
        if seen:  # an answer the table holds drafts nearly all of itself
            assert stats.acceptance > 0.8 and stats.tokens_per_round > 2
