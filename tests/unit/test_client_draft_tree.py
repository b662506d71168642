"""Token trees (engine/client/draft_tree.py) and tree rounds in the speculative loop (greedy == plain)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.client.draft_tree import (
    Calibration,
    DraftTree,
    NgramTreeDrafter,
    best_tree_size,
    build_tree,
    line_cost,
    verify_greedy,
)
from engine.client.generation import generate
from engine.client.ngram_drafter import NgramTable
from engine.client.sampling import SamplingParams
from engine.client.speculative import PromptLookupDrafter, SpeculationConfig, SpeculationStats
from tests.unit.test_client_speculative import RollbackModel


def _tree(rows):
    tree = DraftTree()
    for token, parent in rows:
        tree.add(token, parent)
    return tree


def test_verify_greedy_walks_the_models_choices():
    # roots 5 and 6; 7 under 5; 8 and 9 under 7
    tree = _tree([(5, -1), (6, -1), (7, 0), (8, 2), (9, 2)])
    assert tree.path(4) == [0, 2, 4] and tree.children(-1) == [0, 1] and not tree.is_chain()
    # targets[0] after the last verified token, targets[1 + i] after row i
    assert verify_greedy(tree, [5, 7, 0, 9, 0, 42]) == ([0, 2, 4], 42)
    assert verify_greedy(tree, [6, 0, 11, 0, 0, 0]) == ([1], 11)
    assert verify_greedy(tree, [3, 0, 0, 0, 0, 0]) == ([], 3)
    assert verify_greedy(tree, [5, 8, 0, 0, 0, 0]) == ([0], 8)  # 8 is a grandchild, not a child of row 0
    with pytest.raises(ValueError, match="need 6 target tokens"):
        verify_greedy(tree, [5])
    with pytest.raises(ValueError, match="not a row"):
        tree.add(1, 9)


def test_build_tree_expands_the_likeliest_rows_first_and_stops_where_rows_cost_more():
    # A source that is sure of token 1 after anything ending in 1s, and offers two unlikely alternatives.
    def source(path):
        return [(1, "sure", 0.9), (2, "maybe", 0.2), (3, "rare", 0.05)]

    # Siblings' chances are scaled to sum to 1 (0.78, 0.17, 0.04): the chain of 1s (0.78^k) goes first, until
    # 0.78^8 falls below the first alternative 2 (0.17); that one hangs off the root.
    tree = build_tree(source, max_rows=10, row_cost=0.0)
    assert len(tree) == 10 and tree.tokens[:7] == [1] * 7 and tree.parents[:7] == [-1, 0, 1, 2, 3, 4, 5]
    assert (2, -1) in zip(tree.tokens, tree.parents, strict=True) and not tree.is_chain()
    # The chance of a row is its parent's times its own: 0.9^k for the chain, 0.2 (x 0.9^k) for the 2s.
    cheap = build_tree(source, max_rows=15, row_cost=0.01)
    costly = build_tree(source, max_rows=15, row_cost=0.5)
    assert len(costly) < len(cheap) <= 15
    assert 3 not in costly.tokens  # a 5% candidate is not worth half a round
    assert len(build_tree(lambda path: [], max_rows=8, row_cost=0.0)) == 0


def test_best_tree_size_on_a_line_is_the_one_row_at_a_time_rule():
    """On a straight line the whole-curve choice keeps exactly the rows the per-row rule kept (a row of
    chance p while p > c * E / (1 + n * c)): the rate rises, then falls, once."""
    generator = torch.Generator().manual_seed(3)
    for trial in range(200):
        chances = sorted(torch.rand(8, generator=generator).pow(3).tolist(), reverse=True)
        c = [0.0, 0.01, 0.05, 0.2, 1.0][trial % 5]
        kept, expected = 0, 1.0
        for p in chances:
            if p <= c * expected / (1 + kept * c):
                break
            kept, expected = kept + 1, expected + p
        assert best_tree_size(chances, line_cost(c)) == kept, (chances, c)
    assert best_tree_size([], line_cost(0.05)) == 0


def test_best_tree_size_weighs_whole_stairs_and_prices_a_nearly_free_row_as_such():
    # Rows 2 and 3 climb a stair together: the second row alone does not pay for it, both do.
    stairs = {1: 1.0, 2: 1.0, 3: 1.2, 4: 1.2, 5: 1.4}.__getitem__
    assert best_tree_size([0.5, 0.15, 0.15], stairs) == 1  # 1.80 / 1.2 = 1.5: a tie, the fewest rows
    assert best_tree_size([0.5, 0.16, 0.16], stairs) == 3  # 1.82 / 1.2 > 1.5
    assert best_tree_size([0.5, 0.16], stairs) == 1  # a grow-while-better rule stops here, and so it should
    # 14i's WAN rounds (ms, one row 181): a second row costs 2%, so a 5% candidate goes in, where the line
    # fitted through the same rounds (~9 ms a row, 0.05 of a round) sends none.
    wan = dict(zip(range(1, 9), (181, 184, 209, 216, 227, 241, 243, 244), strict=True))
    measured = lambda rows: wan[rows] / wan[1]  # noqa: E731
    assert best_tree_size([0.05], measured) == 1 and best_tree_size([0.05], line_cost(0.05)) == 0
    # Low chances: the stair from 2 to 3+ rows is not worth 0.03-chance rows, 7 such rows over 2 not either.
    assert best_tree_size([0.2, 0.03, 0.03, 0.03, 0.03, 0.03, 0.03], measured) == 1
    # Likely rows: up to the end of the 6-8-row stair.
    assert best_tree_size([0.6, 0.4, 0.3, 0.25, 0.2, 0.15, 0.12], measured) == 7
    # A size measured cheaper than a smaller one (noise, or an unseen size's line below a seen stair) is
    # priced as the smaller one: it does not lure the tree past a stair that does not pay.
    dip = {1: 1.0, 2: 1.2, 3: 1.1}.__getitem__
    assert best_tree_size([0.15, 0.01], dip) == 0  # 1.16 / 1.1 would look better than one row alone


def test_build_tree_cuts_at_the_measured_size_and_matches_the_float_on_a_line():
    def source(path):
        return [(1, "sure", 0.9), (2, "maybe", 0.2), (3, "rare", 0.05)]

    for c in (0.0, 0.01, 0.05, 0.5):  # a float and the same line as a callable give the same tree
        by_float = build_tree(source, max_rows=12, row_cost=c)
        by_curve = build_tree(source, max_rows=12, row_cost=line_cost(c))
        assert (by_float.tokens, by_float.parents) == (by_curve.tokens, by_curve.parents)
    # Rounds of up to 4 rows cost the same, more rows twice as much: the tree stops at 3 rows.
    flat = build_tree(source, max_rows=12, row_cost=lambda rows: 1.0 if rows <= 4 else 2.0)
    assert flat.tokens == [1, 1, 1] and flat.parents == [-1, 0, 1]


def test_calibration_learns_how_often_a_kind_is_right():
    calibration = Calibration(weight=4)
    assert calibration.chance("x", 0.5) == 0.5
    tree = _tree([(5, -1), (6, -1), (7, 0)])
    tree.kinds = ["a", "b", "a"]
    for _ in range(20):
        calibration.observe(tree, [1])  # b right every time; a never (its child never reachable)
    assert calibration.chance("b", 0.1) > 0.8 and calibration.chance("a", 0.5) < 0.1


def test_ngram_tree_drafter_offers_every_earlier_continuation_and_the_tables_guesses():
    history = [1, 2, 3, 9, 1, 2, 4, 7, 1, 2]
    drafter = NgramTreeDrafter(PromptLookupDrafter(3), None, 3)
    drafter._update_index(history)
    candidates = drafter.candidates(history, [])
    tokens = [token for token, _, _ in candidates]
    assert tokens[:2] == [4, 3]  # after "1 2": 4 (latest) then 3
    assert all(kind[0] == "lookup" for _, kind, _ in candidates)
    tree = drafter.propose_tree(history, max_rows=6, row_cost=0.01)
    assert set(tree.tokens[r] for r in tree.children(-1)) >= {3, 4}
    assert tree.tokens[tree.children(tree.tokens.index(4))[0]] == 7  # the branch continues the copy
    table = NgramTable.build([([50, 60, 70, 80], 0), ([50, 60, 71], 0)], vocab_size=100)
    with_table = NgramTreeDrafter(PromptLookupDrafter(3), table, 3)
    with_table._update_index([50, 60])
    found = with_table.candidates([50, 60], [])
    assert (70, ("ngram", 2, 2, 0)) in [(token, kind) for token, kind, _ in found]
    # the chain drafter still drafts chains for routes without trees
    assert with_table.propose([1, 2, 3, 1, 2], 2)[0] == [3, 1]


# --- tree rounds in the loop, against local transformers (each row computed on its own path) ---


class TreeSession:
    def __init__(self, max_length: int):
        self.tokens: list[int] = []  # what the "servers" hold
        self.tree: tuple[int, list[int]] | None = None
        self.max_length = max_length
        self.output_ids = None
        self.tree_steps = 0

    @property
    def position(self) -> int:
        return len(self.tokens)

    def close(self):
        pass


class TreeModel(RollbackModel):
    """Rolls back, takes trees, and computes every row's logits from the tokens on its own path."""

    session_type = TreeSession

    def _logits_after(self, tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.hf(input_ids=torch.tensor([tokens])).logits[0, -1]

    def session_logits_all(
        self, session, input_ids, *, start_from_position=None, last=None, tree_parents=None
    ):
        if start_from_position is not None:
            del session.tokens[start_from_position:]
        ids = input_ids[0].tolist()
        assert session.position + len(ids) <= session.max_length
        chain = len(ids) - len(tree_parents or [])
        before = session.tokens + ids[:chain]
        rows = [self._logits_after(before[: len(session.tokens) + i + 1]) for i in range(chain)]
        for i, _ in enumerate(tree_parents or []):
            path, r = [], i
            while r >= 0:
                path, r = [r, *path], tree_parents[r]
            rows.append(self._logits_after(before + [ids[chain + j] for j in path]))
        session.tree = (len(before), list(tree_parents)) if tree_parents else None
        session.tree_steps += tree_parents is not None
        session.tokens = before + ids[chain:]
        logits = torch.stack(rows)[None]
        return logits if last is None else logits[:, -last:]

    def can_take_trees(self, session):
        return True

    def accept_tree(self, session, path):
        base, _ = session.tree
        session.tokens = session.tokens[:base] + [session.tokens[base + r] for r in path]
        session.tree = None


class OracleTreeDrafter:
    """A tree whose first root is wrong every `wrong_every` rounds (the truth is then a sibling or absent)."""

    name = "oracle_tree"

    def __init__(self, truth: list[int], prompt_length: int, wrong_every: int):
        self.truth, self.prompt_length, self.wrong_every = truth, prompt_length, wrong_every
        self.calls = 0
        self.observed = 0

    def propose(self, history, k):
        return [], None, None

    def propose_tree(self, history, max_rows, row_cost):
        self.calls += 1
        done = len(history) - self.prompt_length
        truth = self.truth[done : done + 3]
        tree = DraftTree()
        if not truth:
            return tree
        wrong = (truth[0] + 1) % 512
        if self.calls % self.wrong_every == 0:
            tree.add(wrong, -1)
            if self.calls % (2 * self.wrong_every) == 0:
                return tree  # the truth is absent
        parent = -1
        for token in truth:
            parent = tree.add(token, parent)
            tree.add((token + 2) % 512, tree.parents[parent])  # a wrong sibling at every depth
        return tree

    def observe(self, tree, path):
        self.observed += 1


@pytest.mark.parametrize("wrong_every", [1, 3, 1000])
@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_tree_speculation_equals_plain_greedy(hf, wrong_every, penalty):
    ids = torch.randint(5, hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))
    params = SamplingParams(max_new_tokens=16, repetition_penalty=penalty)
    plain = generate(TreeModel(hf), ids, params)
    truth = plain[0, 6:].tolist()
    stats = SpeculationStats()
    drafter = OracleTreeDrafter(truth, 6, wrong_every)
    spec = generate(TreeModel(hf), ids, params, speculation=SpeculationConfig(drafter=drafter), stats=stats)
    assert spec.tolist() == plain.tolist()
    assert stats.tokens == 16 and stats.tree_rounds == drafter.observed > 0
    if wrong_every == 1000:
        assert stats.rounds <= 6  # 4 tokens a round: three drafted and the model's own
    # Sampling keeps chains (and speculative sampling): no tree rounds.
    sampled = SpeculationStats()
    sampling = SamplingParams(max_new_tokens=4, do_sample=True, seed=1, repetition_penalty=penalty)
    generate(TreeModel(hf), ids, sampling, speculation=SpeculationConfig(drafter=drafter), stats=sampled)
    assert sampled.tree_rounds == 0


def test_tree_rounds_price_rows_by_the_measured_round_sizes_unless_told_the_line(hf):
    class Recording(OracleTreeDrafter):
        def propose_tree(self, history, max_rows, row_cost):
            costs.append(row_cost)
            return super().propose_tree(history, max_rows, row_cost)

    ids = torch.randint(5, hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(7))
    params = SamplingParams(max_new_tokens=8)
    truth = generate(TreeModel(hf), ids, params)[0, 6:].tolist()
    for config, expected in (
        (SpeculationConfig(), "curve"),
        (SpeculationConfig(tree_cost="line"), float),
        (SpeculationConfig(learn_cost=False, token_cost=0.07), 0.07),
    ):
        costs = []
        config = dataclasses.replace(config, drafter=Recording(truth, 6, 1000))
        generate(TreeModel(hf), ids, params, speculation=config)
        assert costs
        if expected == "curve":  # RoundCost.relative: a one-row round is the unit, other sizes as measured
            assert all(callable(c) and c(1) == 1.0 for c in costs) and costs[-1](4) > 1.0
        elif expected is float:
            assert all(isinstance(c, float) for c in costs)
        else:
            assert costs == [expected] * len(costs)
    with pytest.raises(ValueError, match="tree_cost must be 'measured' or 'line'"):
        SpeculationConfig(tree_cost="stairs")


def test_ngram_trees_priced_by_measured_sizes_keep_greedy_output(hf):
    # A repetitive prompt, so prompt lookup's trees are often kept; the rounds' real times price them.
    ids = torch.tensor([[7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8, 9]])
    params = SamplingParams(max_new_tokens=12)
    plain = generate(TreeModel(hf), ids, params)
    stats = SpeculationStats()
    drafter = NgramTreeDrafter(PromptLookupDrafter(3), None, 3)
    spec = generate(TreeModel(hf), ids, params, speculation=SpeculationConfig(drafter=drafter), stats=stats)
    assert spec.tolist() == plain.tolist()
    assert stats.tree_rounds > 0


# --- a feature drafter's trees: the features of every verified position reach it, aligned ---


class FeatureTreeModel(TreeModel):
    """TreeModel that also returns each row's last-block output (before the final norm), on its own path."""

    def session_forward(self, session, input_ids, *, start_from_position=None, last=None, tree_parents=None):
        from tests.helpers.feature_drafters import last_block_outputs

        before = session.tokens[: start_from_position if start_from_position is not None else None]
        logits = self.session_logits_all(
            session, input_ids, start_from_position=start_from_position, last=last, tree_parents=tree_parents
        )
        ids = input_ids[0].tolist()
        chain = len(ids) - len(tree_parents or [])
        contexts = [before + ids[: i + 1] for i in range(chain)]
        for i, _ in enumerate(tree_parents or []):
            path, r = [], i
            while r >= 0:
                path, r = [r, *path], tree_parents[r]
            contexts.append(before + ids[:chain] + [ids[chain + j] for j in path])
        hidden = torch.stack([last_block_outputs(self.hf, context)[-1] for context in contexts])
        return logits, hidden[None]


def test_a_feature_drafters_tree_gets_aligned_features_and_greedy_is_unchanged(hf):
    from engine.client.draft_tree import FeatureTreeDrafter
    from tests.helpers.feature_drafters import CheckingFeatureDrafter

    class CheckingTrees(CheckingFeatureDrafter):
        """Checks the features, then offers the greedy chain with a likelier wrong sibling at every depth
        of every other tree (so the tree, not the drafter's first choice, finds the kept path)."""

        def draft_tree(self, tokens, features, *, depth, width, max_nodes):
            chain, _ = self.draft_with_features(tokens, features, depth)  # checks the features
            nodes, parent, score = [], -1, 1.0
            for token in chain:
                if self.calls % 2:
                    nodes.append((parent, (token + 1) % 512, score * 0.6))
                nodes.append((parent, token, score * 0.4))
                parent, score = len(nodes) - 1, score * 0.4
            return nodes[:max_nodes]

    ids = torch.randint(5, hf.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(11))
    params = SamplingParams(max_new_tokens=14)
    plain = generate(TreeModel(hf), ids, params)
    drafter = CheckingTrees(hf, wrong_every=1000)
    stats = SpeculationStats()
    config = SpeculationConfig(drafter=FeatureTreeDrafter(drafter, depth=3), learn_cost=False, token_cost=0.0)
    spec = generate(FeatureTreeModel(hf), ids, params, speculation=config, stats=stats)
    assert spec.tolist() == plain.tolist()
    assert stats.tree_rounds >= stats.rounds - 2 > 0  # every round but the prefill (and a last one) a tree
    assert drafter.calls == stats.tree_rounds and drafter.checked_rows > 0
    assert stats.rounds <= 6  # three drafted tokens kept a round, found off the drafter's first choice


def test_a_feature_drafter_whose_trees_are_never_kept_drafts_only_now_and_then():
    from engine.client.draft_tree import FeatureTreeDrafter

    class Wrong:
        calls = 0

        def draft_tree(self, tokens, features, *, depth, width, max_nodes):
            self.calls += 1
            return [(-1, 7, 0.9), (0, 8, 0.8)]

    drafter = Wrong()
    trees = FeatureTreeDrafter(drafter)
    for _ in range(40):
        tree = trees.propose_tree([1, 2, 3], 8, 0.0, None)
        trees.observe(tree, [])  # the model never agreed
    assert drafter.calls < 12  # about 5 rounds to learn, then one probe every 8 rounds
    trees.observe(DraftTree([7], [-1]), [0])
    trees.observe(DraftTree([7], [-1]), [0])  # agreeing again: a tree every round
    before = drafter.calls
    for _ in range(3):
        trees.propose_tree([1, 2, 3], 8, 0.0, None)
    assert drafter.calls == before + 3
