"""Token trees for speculative decoding: several candidate continuations verified in one trip.

A chain draft is worth its first token's chance of being right; on an ordinary question that is about one
time in ten. A tree sends several candidates for the next token (and for the ones after the likely ones) in
the same step, each row attending only to its own ancestors on the servers (engine/models/tree_step.py), so
a trip whose cost hardly grows with a few more rows keeps the longest branch the model agrees with
(SpecInfer, Miao et al. 2023; Medusa; EAGLE-2's best-first expansion by estimated path probability).

Everything here is pure: `DraftTree` (tokens + parent rows), `verify_greedy` (walk the tree along the model's
argmax tokens), `build_tree` (best-first expansion from any candidate source, cut to the size whose round
brings the most expected tokens per unit of round time: `best_tree_size`), `Calibration` (how often each
kind of candidate turns out right, learned from the rounds), and `NgramTreeDrafter`, the first candidate
source: prompt lookup's continuations of every earlier occurrence plus the n-gram table's guesses. Other
sources (a feature drafter's top-k) only need `candidates(context) -> [(token, kind, prior)]`.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class DraftTree:
    """Draft tokens with their parent rows (-1: a child of the last verified token), parents first."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    kinds: list[Hashable] = field(default_factory=list)  # what proposed each row (for Calibration)

    def __post_init__(self):
        if len(self.parents) != len(self.tokens):
            raise ValueError(f"{len(self.tokens)} tokens need as many parents, got {len(self.parents)}")
        self.kinds = list(self.kinds) + [None] * (len(self.tokens) - len(self.kinds))

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, kind: Hashable = None) -> int:
        if not -1 <= parent < len(self.tokens):
            raise ValueError(f"parent {parent} is not a row of this tree (or -1)")
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.kinds.append(kind)
        return len(self.tokens) - 1

    def path(self, row: int) -> list[int]:
        """Rows from a root down to `row`."""
        rows = []
        while row >= 0:
            rows.append(row)
            row = self.parents[row]
        return rows[::-1]

    def children(self, row: int) -> list[int]:
        return [i for i, parent in enumerate(self.parents) if parent == row]

    def is_chain(self) -> bool:
        return all(parent == i - 1 for i, parent in enumerate(self.parents))


def verify_greedy(tree: DraftTree, targets: Sequence[int]) -> tuple[list[int], int]:
    """The accepted path and the model's next token: `targets[0]` is the model's choice after the last
    verified token, `targets[1 + i]` its choice after row i; from the top, follow the child whose token is the
    model's choice while there is one."""
    if len(targets) != len(tree) + 1:
        raise ValueError(f"need {len(tree) + 1} target tokens for {len(tree)} tree rows, got {len(targets)}")
    path, row, target = [], -1, int(targets[0])
    while True:
        nxt = next((c for c in tree.children(row) if tree.tokens[c] == target), None)
        if nxt is None:
            return path, target
        path.append(nxt)
        row, target = nxt, int(targets[1 + nxt])


# A candidate for the token after some context: (token, kind, prior chance of being the model's choice).
Candidate = tuple[int, Hashable, float]


class Calibration:
    """How often each kind of candidate is the model's choice when it could be (its parent was accepted).

    Starts from each candidate's prior (worth `weight` observations) and moves to what the rounds show."""

    def __init__(self, weight: float = 4.0):
        self.weight = weight
        self._hits: dict[Hashable, float] = defaultdict(float)
        self._trials: dict[Hashable, float] = defaultdict(float)

    def chance(self, kind: Hashable, prior: float) -> float:
        trials = self._trials.get(kind, 0.0)
        return (self._hits.get(kind, 0.0) + prior * self.weight) / (trials + self.weight)

    def observe(self, tree: DraftTree, path: Sequence[int]) -> None:
        """Count every row whose parent was accepted (or a root) as a trial, the accepted ones as hits."""
        reached = {-1, *path}
        for row, parent in enumerate(tree.parents):
            if parent in reached:
                self._trials[tree.kinds[row]] += 1
                self._hits[tree.kinds[row]] += row in reached


def line_cost(row_cost: float) -> Callable[[int], float]:
    """A straight line: a round of `rows` rows costs 1 + (rows - 1) * row_cost one-row rounds."""
    return lambda rows: 1 + (rows - 1) * row_cost


def best_tree_size(chances: Sequence[float], round_cost: Callable[[int], float]) -> int:
    """How many of the rows, in best-first order with these chances of being reached and right, give the
    most expected tokens per unit of round time: (1 + chances[0] + ... + chances[n-1]) / round_cost(1 + n)
    (the round also carries the pending token, and the model's own next token always comes); the fewest
    rows on a tie. The whole curve is weighed, not one row at a time: where round times rise in stairs
    (CPU servers), a row that climbs a stair may not pay alone while the rows up to the stair's end do. A
    size priced below a smaller one (noise, or an unseen size's straight line under a measured stair) costs
    what the smaller one does."""
    cost = round_cost(1)
    best, best_rate, expected = 0, 1.0 / cost, 1.0
    for n, chance in enumerate(chances, start=1):
        expected += chance
        cost = max(cost, round_cost(1 + n))  # more rows never cost less: a cheaper size is noise or a guess
        rate = expected / cost
        if rate > best_rate * (1 + 1e-12):
            best, best_rate = n, rate
    return best


def build_tree(
    candidates: Callable[[list[int]], list[Candidate]],
    *,
    max_rows: int,
    row_cost: float | Callable[[int], float],
    calibration: Calibration | None = None,
    max_children: int = 3,
) -> DraftTree:
    """Best-first: the row with the highest chance of being reached and right goes in next (its chance is
    its parent's times its own), up to `max_rows`; then the tree is cut to the size with the most expected
    tokens per unit of round time (`best_tree_size`). Every cut is a tree: a row comes after its parent.

    `row_cost`: a round of k rows relative to a one-row round, as a callable (the rounds' measured times per
    size, RoundCost.relative) or as one more row's share of a one-row round (a straight line). On a line
    this keeps a row of chance p while p > row_cost * E / (1 + n * row_cost), with n rows and E expected
    tokens so far. `candidates(path_tokens)` proposes tokens after the verified history plus `path_tokens`."""
    round_cost = row_cost if callable(row_cost) else line_cost(row_cost)
    calibration = calibration or Calibration()
    tree = DraftTree()
    chances: list[float] = []
    frontier: list[tuple[float, int, int, int, Hashable]] = []  # (-chance, order, parent, token, kind)
    order = 0

    def expand(parent: int, chance: float) -> None:
        nonlocal order
        context = [tree.tokens[r] for r in tree.path(parent)] if parent >= 0 else []
        seen: dict[int, tuple[float, Hashable]] = {}
        for token, kind, prior in candidates(context):
            p = calibration.chance(kind, prior)
            if token not in seen or p > seen[token][0]:
                seen[token] = (p, kind)
        ranked = sorted(seen.items(), key=lambda item: -item[1][0])[:max_children]
        total = sum(p for _, (p, _) in ranked)
        scale = 1.0 / total if total > 1.0 else 1.0  # siblings exclude each other: at most one is right
        for token, (p, kind) in ranked:
            heapq.heappush(frontier, (-chance * p * scale, order, parent, token, kind))
            order += 1

    expand(-1, 1.0)
    while frontier and len(tree) < max_rows:
        negative, _, parent, token, kind = heapq.heappop(frontier)
        if -negative <= 0.0:
            break  # the rest cannot be right either
        row = tree.add(token, parent, kind)
        chances.append(-negative)
        if len(tree) < max_rows:
            expand(row, -negative)
    size = best_tree_size(chances, round_cost)
    return DraftTree(tree.tokens[:size], tree.parents[:size], tree.kinds[:size])


# --- the first candidate source: prompt lookup's every occurrence + the n-gram table ---

# Priors for a candidate of each kind, before the rounds teach better (from last session's measurements:
# a copy after a 3-token match is right about half the time on input-grounded answers, after 1 token rarely).
LOOKUP_PRIOR = {1: 0.12, 2: 0.3, 3: 0.5}
RANK_FACTOR = (1.0, 0.5, 0.3, 0.2)  # a later-ranked candidate of the same source is right less often


class TreeProposer(Protocol):
    """Proposes a token tree after a history (what speculative_rounds asks of a tree drafter)."""

    name: str

    def propose_tree(
        self, history: Sequence[int], max_rows: int, row_cost: float | Callable[[int], float]
    ) -> DraftTree: ...

    def observe(self, tree: DraftTree, path: Sequence[int]) -> None: ...


class NgramTreeDrafter:
    """Trees from prompt lookup (what followed each earlier occurrence of the last 1-3 tokens, latest first)
    and the n-gram table of the model's own answers (its guesses for the last 3, 2 and 1 tokens, or the
    table's `candidates` when it has them); chains (`propose`) from `chain`, for routes without trees."""

    def __init__(
        self,
        chain: Any,
        table: Any = None,
        max_ngram: int = 3,
        max_children: int = 3,
        calibration: Calibration | None = None,
    ):
        self.chain = chain
        self.table = table
        self.max_ngram = max_ngram
        self.max_children = max_children
        self.calibration = calibration or Calibration()
        self.name = getattr(chain, "name", "prompt_lookup")  # tree rounds show in stats.tree_rounds
        self._index: dict[tuple[int, ...], list[int]] = {}
        self._indexed: list[int] = []

    # chains, as the chain drafter makes them
    def propose(self, history: Sequence[int], k: int):
        if hasattr(self.chain, "propose"):
            return self.chain.propose(history, k)
        return (*self.chain.draft(history, k), None)

    def draft(self, history: Sequence[int], k: int):
        return self.chain.draft(history, k)

    # trees
    def propose_tree(
        self, history: Sequence[int], max_rows: int, row_cost: float | Callable[[int], float]
    ) -> DraftTree:
        history = list(history)
        self._update_index(history)
        return build_tree(
            lambda path: self.candidates(history, path),
            max_rows=max_rows,
            row_cost=row_cost,
            calibration=self.calibration,
            max_children=self.max_children,
        )

    def observe(self, tree: DraftTree, path: Sequence[int]) -> None:
        self.calibration.observe(tree, path)

    def candidates(self, history: list[int], path: list[int]) -> list[Candidate]:
        """Tokens that may follow history + path, with their kinds and priors."""
        context = (history[-self.max_ngram :] + path)[-self.max_ngram :]
        found: list[Candidate] = []
        for n in range(min(self.max_ngram, len(context)), 0, -1):
            followers = self._index.get(tuple(context[-n:]), [])
            distinct: list[int] = []
            for position in reversed(followers):  # latest occurrence first
                # An occurrence that ends at the history's end follows nothing yet.
                if position < len(history) and history[position] not in distinct:
                    distinct.append(history[position])
                if len(distinct) == len(RANK_FACTOR):
                    break
            for rank, token in enumerate(distinct):
                prior = LOOKUP_PRIOR.get(n, LOOKUP_PRIOR[3]) * RANK_FACTOR[rank]
                found.append((token, ("lookup", n, rank), prior))
        if self.table is not None:
            found.extend(self._table_candidates(history + path))
        return found

    def _table_candidates(self, tokens: list[int]) -> list[Candidate]:
        candidates = getattr(self.table, "candidates", None)
        ranked = candidates is None  # guesses of several context lengths: a later one is right less often
        if candidates is not None:  # a table with several followers per context: its shares say it all
            guesses = candidates(tokens, len(RANK_FACTOR))
        else:
            guesses = []
            for n in range(min(3, len(tokens)), 0, -1):
                guess = self.table.guess(tokens[len(tokens) - n :])
                if guess is not None and guess.context == n and all(g.token != guess.token for g in guesses):
                    guesses.append(guess)
        found = []
        for rank, guess in enumerate(guesses[: len(RANK_FACTOR)]):
            bucket = min(int(guess.share * 4), 3)  # quarters of the context's continuations
            kind = ("ngram", guess.context, bucket, min(rank, 2))
            factor = RANK_FACTOR[min(rank, 3)] if ranked else 1.0
            found.append((guess.token, kind, guess.share * factor * 0.7))
        return found

    def _update_index(self, history: list[int]) -> None:
        """Positions after every 1..max_ngram-token run of the history (extended as the history grows)."""
        if self._indexed != history[: len(self._indexed)]:
            self._index, self._indexed = {}, []
        for end in range(len(self._indexed) + 1, len(history) + 1):
            for n in range(1, min(self.max_ngram, end) + 1):
                self._index.setdefault(tuple(history[end - n : end]), []).append(end)
        self._indexed = list(history)


# --- a feature drafter's trees (engine/client/feature_drafter.py `draft_tree`), with prompt lookup's ---


class FeatureTreeDrafter:
    """Trees from a feature drafter's EAGLE-2 expansion (its nodes' conditional probabilities, calibrated
    by the rounds) merged with prompt lookup's candidates; chains (`draft_with_features`) from the drafter
    itself, for routes without trees. Drafts from the last block's features, as the drafter does."""

    wants_features = True
    # Drafting a tree costs the drafter's time on every round, however few rows it keeps: while the kept
    # paths average fewer than MIN_GAIN tokens, a tree is drafted only every PROBE_EVERY rounds.
    MIN_GAIN = 0.1
    PROBE_EVERY = 8

    def __init__(
        self,
        drafter: Any,
        *,
        lookup: NgramTreeDrafter | None = None,
        depth: int = 2,  # drafting is on the critical path: depth 2 keeps nearly all of depth 4's gain
        width: int = 4,
        calibration: Calibration | None = None,
    ):
        self.drafter, self.lookup = drafter, lookup
        self.depth, self.width = depth, width
        self.calibration = calibration or Calibration()
        self.name = getattr(drafter, "name", "feature")
        self.gain = 0.5  # running mean of the kept path's length
        self._idle = 0

    def draft_with_features(self, tokens: Sequence[int], features: Any, k: int):
        return self.drafter.draft_with_features(tokens, features, k)

    def propose_tree(
        self, history: Sequence[int], max_rows: int, row_cost: float | Callable[[int], float], features: Any
    ) -> DraftTree:
        if self.gain < self.MIN_GAIN:
            self._idle += 1
            if self._idle < self.PROBE_EVERY:
                return DraftTree()
        self._idle = 0
        history = list(history)
        nodes = self.drafter.draft_tree(
            history, features, depth=self.depth, width=self.width, max_nodes=max(2 * max_rows, 1)
        )
        paths: dict[int, tuple[int, ...]] = {-1: ()}
        scores: dict[int, float] = {-1: 1.0}
        children: dict[tuple[int, ...], list[Candidate]] = defaultdict(list)
        for index, (parent, token, score) in enumerate(nodes):
            if parent not in paths:
                continue  # its parent was cut (select_tree keeps parents; this is a guard)
            paths[index] = (*paths[parent], int(token))
            scores[index] = float(score)
            chance = min(max(float(score) / max(scores[parent], 1e-9), 0.0), 1.0)  # its own softmax share
            kind = ("feature", min(int(chance * 10), 9))  # tenths of the drafter's own confidence
            children[paths[parent]].append((int(token), kind, chance))
        if self.lookup is not None:
            self.lookup._update_index(history)

        def candidates(path: list[int]) -> list[Candidate]:
            found = list(children.get(tuple(path), ()))
            if self.lookup is not None:  # copies from the conversation (input-grounded answers)
                found += [c for c in self.lookup.candidates(history, path) if c[1][0] == "lookup"]
            return found

        return build_tree(
            candidates,
            max_rows=max_rows,
            row_cost=row_cost,
            calibration=self.calibration,
            max_children=self.width,
        )

    def observe(self, tree: DraftTree, path: Sequence[int]) -> None:
        self.calibration.observe(tree, path)
        self.gain = 0.7 * self.gain + 0.3 * len(path)
