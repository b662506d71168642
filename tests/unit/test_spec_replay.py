"""bench/spec_replay.py: the real speculative loop over a known answer on a fake clock."""

from __future__ import annotations

import pytest

import engine.client.speculative as speculative
from bench.spec_replay import _drafter_rows, replay, step_seconds
from engine.client.ngram_drafter import NgramTable

STAIRS = (100.0, 100.0, 150.0, 150.0)


def test_step_costs_follow_the_stairs_then_their_last_step_per_row():
    assert step_seconds(1, STAIRS) == step_seconds(2, STAIRS) == 0.1
    assert step_seconds(4, STAIRS) == 0.15
    assert step_seconds(6, STAIRS) == 0.15  # the last step per row is 0 here
    assert step_seconds(5, (100.0, 120.0)) == pytest.approx(0.18)


def test_replays_keep_the_answer_and_count_each_rounds_time():
    # An answer that repeats its prompt: prompt lookup and the table (built from it) draft it well.
    prompt = [5, 6, 7, 8, 9, 10, 11, 12] * 2
    answer = [5, 6, 7, 8, 9, 10, 11, 12] * 3
    table = NgramTable.build([(prompt + answer, len(prompt))], vocab_size=64)
    rows = _drafter_rows(table)
    for name in ("chain-known", "tree", "lookup"):
        make, options = rows[name]
        rounds, tokens, seconds = replay(
            make, options, [(prompt, answer)] * 2, vocab=64, new_tokens=16, stairs_ms=STAIRS, warmups=1
        )
        assert tokens == 16 and rounds < 16  # several tokens a round (greedy equality is checked inside)
        decoding = rounds - 1  # the prompt's round is not on the clock
        assert 0.1 * decoding - 1e-9 <= seconds <= 0.15 * decoding + 1e-9
    assert speculative.time.__name__ == "time"  # the real clock is back
