"""Tree steps (engine/models/tree_step.py): each branch of a tree computes what it would as a chain alone."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.models import load_block_span
from engine.models.tree_step import check_parents, check_path, depths, step_positions, tree_mask

# Two roots; row 1 and 2 are siblings under 0, 3 under 1, 5 under 4, 6 under 2 (positions past + depth).
PARENTS = [-1, 0, 0, 1, -1, 4, 2]
PATHS = [[0, 1, 3], [0, 2, 6], [4, 5], [0], []]


def _path_to(row: int, parents) -> list[int]:
    path = []
    while row >= 0:
        path.append(row)
        row = parents[row]
    return path[::-1]


def _chain(span, embeddings, cuts, lean: bool):
    """Outputs of consecutive ordinary steps over embeddings[:, a:b], and the cache they leave."""
    saved = span._lean
    span._lean = saved if lean else None
    try:
        cache = span.new_cache(batch_size=embeddings.shape[0], max_length=64)
        pairs = [(a, b) for a, b in itertools.pairwise(cuts) if b > a]
        outs = [span.step(embeddings[:, a:b], cache) for a, b in pairs]
        return torch.cat(outs, dim=1), cache
    finally:
        span._lean = saved


def _tree(span, prefix, chain_rows, tree_rows, lean: bool):
    """A cache holding `prefix`, then one step of `chain_rows` followed by the tree rows (PARENTS)."""
    saved = span._lean
    span._lean = saved if lean else None
    try:
        cache = span.new_cache(batch_size=prefix.shape[0], max_length=64)
        if prefix.shape[1]:
            span.step(prefix, cache)
        step = torch.cat([chain_rows, tree_rows], dim=1)
        return span.step(step, cache, tree_parents=PARENTS), cache
    finally:
        span._lean = saved


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("llama", {}),
        ("qwen3", {}),
        ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
        ("mixtral", {}),
    ],
)
@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("chain", [1, 5])  # rows before the tree in one step: the pending token, a replay
def test_every_branch_equals_its_chain_and_compaction_continues_it(
    tiny_checkpoint_factory, arch, overrides, lean, chain
):
    span = load_block_span(tiny_checkpoint_factory(arch, **overrides), 1, 4)
    if lean and span._lean is None:
        pytest.skip(f"{arch} has no lean path")
    hidden = span.config.hidden_size
    generator = torch.Generator().manual_seed(3)
    prefix = torch.randn(2, 6 - chain, hidden, generator=generator)
    chain_rows = torch.randn(2, chain, hidden, generator=generator)
    tree_rows = torch.randn(2, len(PARENTS), hidden, generator=generator)
    next_row = torch.randn(2, 1, hidden, generator=generator)
    tree_out, _ = _tree(span, prefix, chain_rows, tree_rows, lean)
    before = torch.cat([prefix, chain_rows], dim=1)
    for row in range(len(PARENTS)):
        path = _path_to(row, PARENTS)
        sequence = torch.cat([before, tree_rows[:, path]], dim=1)
        reference, _ = _chain(span, sequence, [0, 6, 6 + len(path)], lean)
        got = tree_out[:, chain + row]
        error = (got - reference[:, -1]).abs().max().item()
        assert error <= 1e-5, f"row {row} (path {path}): max abs error {error:.3g}"
    for path in PATHS:
        _, cache = _tree(span, prefix, chain_rows, tree_rows, lean)
        cache.compact(6, check_path(path, PARENTS))
        assert cache.length == 6 + len(path)
        continued = span.step(next_row, cache)
        sequence = torch.cat([before, tree_rows[:, path], next_row], dim=1)
        reference, _ = _chain(span, sequence, [0, 6, 6 + len(path), 7 + len(path)], lean)
        assert (continued - reference[:, -1:]).abs().max().item() <= 1e-5, f"path {path}"


def test_tree_layout_and_checks():
    assert depths(PARENTS) == [0, 1, 1, 2, 0, 1, 2]
    assert step_positions(10, 9, PARENTS) == [10, 11, 12, 13, 13, 14, 12, 13, 14]
    mask = tree_mask(2, 3, [-1, -1], None)  # one chain row, two sibling roots, after 2 cached
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, False, True],
    ]
    windowed = tree_mask(3, 3, [-1, 0, 1], 2)  # positions 3, 4, 5; a window of 2
    assert windowed.tolist() == [
        [False, False, True, True, False, False],
        [False, False, False, True, True, False],
        [False, False, False, False, True, True],
    ]
    for bad, message in [
        ([], "non-empty"),
        ([0], "earlier tree row"),
        ([-1, 1], "earlier tree row"),
        ([-1, -2], "earlier tree row"),
        ([-1, True], "earlier tree row"),
        ("x", "non-empty list"),
        ([-1] * 4, "4 entries for a step of 3 rows"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_parents(bad, 3)
    for bad, message in [
        ([1], "path from a root"),
        ([0, 3], "parent is 1"),
        ([0, 7], "0..6"),
        ({"a": 1}, "list of tree row"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_path(bad, PARENTS)


def test_spans_without_tree_support_refuse_tree_steps(tiny_checkpoint_factory):
    span = load_block_span(tiny_checkpoint_factory("bloom"), 0, 2)
    assert not span.supports_trees
    cache = span.new_cache(batch_size=1, max_length=8)
    with pytest.raises(ValueError, match="do not take tree steps"):
        span.step(torch.randn(1, 2, span.config.hidden_size), cache, tree_parents=[-1, 0])
    assert load_block_span(tiny_checkpoint_factory("llama"), 0, 2).supports_trees
