"""Tree steps: one inference step that carries several candidate continuations at once (a token tree).

A step's last m rows may form a tree (SpecInfer, Medusa, EAGLE-2): `parents[i]` names the tree row that row i
continues (an earlier one), or -1 for the row just before the tree (the step's last ordinary row, or the last
cached position). A tree row sits at the position after its parent's and attends to everything before the
tree and to its own ancestors and itself only, so every branch computes exactly what it would as a chain of
its own. The rows before the tree are an ordinary causal chain (a replay that rebuilds a cache sends the kept
prefix there, followed by the same tree). All rows are written to the cache one after the other; the next
step says which root-to-node path was accepted (`check_path`) and the cache moves those rows' keys and values
to consecutive positions (SpanCache.compact), where their rotary positions already belong.

Everything here is pure: the checks raise ValueError with a message a person can act on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_parents(parents: object, length: int) -> list[int]:
    """`parents` as a list of ints for the last len(parents) rows of a `length`-row step, or ValueError."""
    if not isinstance(parents, list | tuple) or not parents:
        raise ValueError(f"tree_parents must be a non-empty list of ints, got {parents!r:.80}")
    if len(parents) > length:
        raise ValueError(f"tree_parents has {len(parents)} entries for a step of {length} rows")
    for i, parent in enumerate(parents):
        if isinstance(parent, bool) or not isinstance(parent, int) or not -1 <= parent < i:
            raise ValueError(
                f"tree_parents[{i}] must be -1 or the index of an earlier tree row (0..{i - 1}), "
                f"got {parent!r:.40}"
            )
    return list(parents)


def depths(parents: Sequence[int]) -> list[int]:
    """Each tree row's depth: 0 for the children of the row before the tree, parent's + 1 below."""
    result: list[int] = []
    for parent in parents:
        result.append(0 if parent < 0 else result[parent] + 1)
    return result


def step_positions(past: int, length: int, parents: Sequence[int]) -> list[int]:
    """Absolute positions of a step's `length` rows after `past` cached ones, its last rows a tree."""
    chain = length - len(parents)
    return [past + i for i in range(chain)] + [past + chain + d for d in depths(parents)]


def tree_mask(
    past: int, length: int, parents: Sequence[int], window: int | None, device=None
) -> torch.Tensor:
    """Which keys each new row may attend to, [length, past + length] (True = may): the ordinary causal rule
    for the chain rows, everything before the tree plus ancestors and self for tree rows; with a sliding
    `window`, only keys less than `window` positions behind the query."""
    chain, rows = length - len(parents), len(parents)
    allowed = torch.zeros(length, past + length, dtype=torch.bool)
    before = past + chain  # keys every tree row sees
    allowed[:, :before] = torch.ones(length, before, dtype=torch.bool).tril(past)
    ancestors = torch.zeros(rows, rows, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            ancestors[i] = ancestors[parent]
        ancestors[i, i] = True
    allowed[chain:, before:] = ancestors
    if window is not None:
        queries = torch.tensor(step_positions(past, length, parents))
        keys = torch.cat([torch.arange(past), queries])
        allowed &= (queries[:, None] - keys[None, :]) < window
    return allowed.to(device) if device is not None else allowed


def check_path(path: object, parents: Sequence[int]) -> list[int]:
    """`path` as a list of tree rows from a root down (each row the next one's parent), or ValueError."""
    if not isinstance(path, list | tuple):
        raise ValueError(f"tree_accepted must be a list of tree row indices, got {path!r:.80}")
    previous = -1
    for j, row in enumerate(path):
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < len(parents):
            raise ValueError(
                f"tree_accepted[{j}] must be a row of the previous step's tree (0..{len(parents) - 1}), "
                f"got {row!r:.40}"
            )
        if parents[row] != previous:
            raise ValueError(
                f"tree_accepted must be a path from a root down: row {row}'s parent is {parents[row]}, "
                f"not {previous}"
            )
        previous = row
    return list(path)
