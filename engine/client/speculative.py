"""Speculative decoding through the swarm: draft a few tokens here, verify them all in one inference step.

Each round sends the pending token(s) plus k drafted tokens through the chain at once and gets the full
model's logits at every position. The longest prefix of the draft that the full model agrees with is kept,
plus one token of the model's own (the correction, or a bonus when all k were right), so a round yields
1 to k + 1 tokens for one trip through the swarm; the servers then cut the rejected tokens out of their KV
caches (`start_from_position`) at the start of the next round.

- Greedy: a draft token is kept when it is the argmax (after the repetition penalty), so the output is
  plain greedy decoding token for token.
- Sampling: standard speculative sampling (Leviathan et al. 2023, Chen et al. 2023): keep draft token d with
  probability min(1, p(d) / q(d)), else draw from the residual max(p - q, 0); the output has the target
  distribution p whatever the draft distribution q (a point mass for prompt lookup).

Drafters: prompt lookup (the continuation of the latest earlier occurrence of the last n tokens, no model)
and, optionally, a small local causal LM sharing the tokenizer, the model's own first blocks
(engine.client.early_exit), or a feature drafter (EAGLE-style, engine.client.feature_drafter) that drafts
from the last block's outputs at the verified positions, which every round brings back with the logits
(engine.client.feature_history). The draft length adapts to the acceptance observed for each kind of proposal
(prompt lookup: each match length; `DraftLength`) and to what one more token costs a round, learned from
the rounds' own times (`RoundCost`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from engine.client.draft_tree import DraftTree, NgramTreeDrafter, verify_greedy
from engine.client.feature_history import session_features, wants_features
from engine.client.sampling import SamplingParams, apply_repetition_penalty, apply_top_k, apply_top_p


@dataclass(frozen=True)
class SpeculationConfig:
    """How to speculate: drafter, draft lengths, and the assumed cost of one more token per round."""

    min_draft: int = 0  # 0: stop drafting while acceptance is too low to pay (probing now and then)
    max_draft: int = 8
    initial_draft: int = 4
    probe_every: int = 8  # with no drafting, draft one token every this many rounds to re-measure
    max_ngram: int = 3  # prompt lookup matches the last max_ngram..1 tokens
    # Extra time of one more token in a round, relative to a one-token round (mostly round trips over a WAN,
    # so small); it keeps the draft short when acceptance is low.
    # The prior only: each generation learns the real ratio from its own rounds (RoundCost).
    token_cost: float = 0.05
    learn_cost: bool = True  # False: keep token_cost fixed
    draft_model: Any = None  # an optional local causal LM (transformers) with the same tokenizer
    # Early-exit drafting (engine.client.early_exit): the model's first draft_blocks blocks run here, when
    # they fit in max_draft_bytes; 0 drafts by prompt lookup. Used by DistributedModelForCausalLM.
    draft_blocks: int = 0
    max_draft_bytes: int = 256 * 2**20
    drafter: Any = None  # any object with Drafter's `draft` or FeatureDrafter's (overrides all others)
    # A trained feature drafter (engine.client.feature_drafter): "auto" uses the one shipped for the served
    # model when there is one; a path loads that drafter folder; a callable returns a fresh drafter (one per
    # generation: it keeps a cache); None never. Used by DistributedModelForCausalLM; what drafts, first
    # that applies: drafter, draft_model, a feature drafter path or callable, draft_blocks, "auto".
    feature_drafter: Any = "auto"
    # The table of the model's own habits (engine.client.ngram_drafter): "auto" uses the one shipped for the
    # served model, a path loads that table, None never; it drafts when no drafter above applies.
    ngram_table: Any = "auto"
    # With a feature drafter: a prompt-lookup copy after a match of at least this many tokens is sent
    # instead of the drafter's draft (free, and right more often on input-grounded answers); 0: never.
    lookup_min_match: int = 2
    # Greedy decoding on routes whose servers all take tree steps: up to this many draft rows per round as a
    # token tree (engine/client/draft_tree.py: several candidates verified at once); 0: chains only. Prompt
    # lookup, the n-gram table and feature drafters propose trees; early-exit and draft models draft chains.
    tree_rows: int = 8
    # How a tree's size is priced: "measured" weighs each round size's own measured time (RoundCost.relative:
    # CPU servers' rounds rise in stairs); "line" one straight line through all rounds (the policy before
    # per-size costs, kept for paired benches).
    tree_cost: str = "measured"

    def __post_init__(self):
        if not 0 <= self.min_draft <= self.initial_draft <= self.max_draft or self.initial_draft < 1:
            raise ValueError("need 0 <= min_draft <= initial_draft <= max_draft and initial_draft >= 1")
        if self.probe_every < 1:
            raise ValueError("probe_every must be >= 1")
        if self.max_ngram < 1 or self.token_cost < 0 or self.lookup_min_match < 0:
            raise ValueError("max_ngram must be >= 1, token_cost and lookup_min_match >= 0")
        if self.draft_blocks < 0 or self.max_draft_bytes < 0:
            raise ValueError("draft_blocks and max_draft_bytes must be >= 0")
        if not 0 <= self.tree_rows <= 15:  # with the pending token, a step the servers' lean path takes
            raise ValueError("tree_rows must be in [0, 15]")
        if self.tree_cost not in ("measured", "line"):
            raise ValueError(f"tree_cost must be 'measured' or 'line', not {self.tree_cost!r}")


@dataclass
class SpeculationStats:
    """What speculation did in one generation (reported in the API's timings and the bench)."""

    rounds: int = 0  # inference steps through the swarm
    tokens: int = 0  # tokens produced
    drafted: int = 0  # draft tokens sent for verification
    accepted: int = 0  # draft tokens the full model agreed with
    fallback_rounds: int = 0  # rounds without a draft (nothing to propose, or a route that cannot roll back)
    drafter: str | None = None  # which drafter drafted: prompt_lookup, feature, early_exit, draft_model, ...
    tree_rounds: int = 0  # rounds with a token tree (its rows count as drafted, the kept path as accepted)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_round(self) -> float | None:
        return self.tokens / self.rounds if self.rounds else None

    def as_dict(self) -> dict:
        return dict(
            rounds=self.rounds,
            drafted=self.drafted,
            accepted=self.accepted,
            acceptance=self.acceptance,
            tokens_per_round=self.tokens_per_round,
            drafter=self.drafter,
            tree_rounds=self.tree_rounds,
        )


# --- drafters ---


class Drafter(Protocol):
    def draft(self, history: Sequence[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to k tokens to follow `history`, and their draft distributions [n, vocab] (None: point mass)."""


class FeatureDrafter(Protocol):
    """Drafts from the full model's last-block outputs (before the final norm) at the verified positions."""

    wants_features: bool  # True

    def draft_with_features(
        self, tokens: Sequence[int], features: torch.Tensor, k: int
    ) -> tuple[list[int], torch.Tensor | None]:
        """Up to k tokens after `tokens` (all n so far) given `features` [n - 1, hidden] (row i: position
        i; the last token has none yet), and their draft distributions [m, vocab] (None: point mass)."""


class PromptLookupDrafter:
    """Drafts by looking up the last n tokens earlier in the conversation and copying what followed."""

    name = "prompt_lookup"

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def draft(self, history: Sequence[int], k: int) -> tuple[list[int], None]:
        return prompt_lookup(history, k, self.max_ngram), None

    def propose(self, history: Sequence[int], k: int) -> tuple[list[int], None, int]:
        """Up to k tokens, and the length n of the match they follow: a copy after a 3-token match is
        right far more often than one after a single token, so each n gets its own draft length."""
        tokens, n = prompt_lookup_match(history, k, self.max_ngram)
        return tokens, None, n


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share (drafters with a cache reuse it that far)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prompt_lookup(history: Sequence[int], k: int, max_ngram: int = 3) -> list[int]:
    """The k tokens after the latest earlier occurrence of history's last n tokens (n = max_ngram..1)."""
    return prompt_lookup_match(history, k, max_ngram)[0]


def prompt_lookup_match(history: Sequence[int], k: int, max_ngram: int = 3) -> tuple[list[int], int]:
    """`prompt_lookup`'s tokens and the n of the match they follow (0 with no match)."""
    history = list(history)
    size = len(history)
    for n in range(min(max_ngram, size - 1), 0, -1):
        tail = history[size - n :]
        for start in range(size - n - 1, -1, -1):  # latest occurrence first: recent context predicts best
            if history[start : start + n] == tail:
                follow = history[start + n : start + n + k]
                if follow:
                    return follow, n
    return [], 0


class DraftModelDrafter:
    """Drafts greedily with a small local causal LM (transformers) that shares the target's tokenizer.

    It re-reads the whole history each round (no cache kept across rounds): simple and always consistent
    with rollbacks; fine for draft models small enough to be worth using here.
    """

    name = "draft_model"

    def __init__(self, model, params: SamplingParams | None = None):
        self.model = model.eval()
        self.params = params

    def draft(self, history: Sequence[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        ids = torch.tensor([list(history)], dtype=torch.int64)
        tokens: list[int] = []
        probs = []
        cache = None
        with torch.no_grad():
            step_ids = ids
            for _ in range(k):
                out = self.model(input_ids=step_ids, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits = out.logits[:, -1].float()
                if self.params is not None and self.params.sampling:
                    row = target_probs(logits, ids, self.params)[0]
                    token = int(torch.multinomial(row, 1))
                    probs.append(row)
                else:
                    token = int(logits.argmax(-1))
                tokens.append(token)
                step_ids = torch.tensor([[token]])
                ids = torch.cat([ids, step_ids], dim=1)
        return tokens, (torch.stack(probs) if probs else None)


# --- verification ---


def target_probs(logits: torch.Tensor, previous_ids: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `next_tokens` samples from, for last-position `logits` [batch, vocab]."""
    logits = apply_repetition_penalty(logits.float(), previous_ids, params.repetition_penalty)
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p is not None:
        logits = apply_top_p(logits, params.top_p)
    return logits.softmax(dim=-1)


def accept_draft(
    probs: torch.Tensor,
    draft: Sequence[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Speculative sampling's acceptance rule: (number of draft tokens kept, the token that follows them).

    `probs` [k + 1, vocab]: the target distribution at each draft position and after the whole draft.
    `draft_probs` [k, vocab]: the distribution each draft token was drawn from; None means a point mass
    (a deterministic drafter such as prompt lookup), for which the rule keeps d with probability p(d).
    """
    k = len(draft)
    if probs.shape[0] != k + 1:
        raise ValueError(f"need {k + 1} target distributions for {k} draft tokens, got {probs.shape[0]}")
    for i, token in enumerate(draft):
        p = float(probs[i, token])
        q = float(draft_probs[i, token]) if draft_probs is not None else 1.0
        u = float(torch.rand((), generator=generator))
        if q > 0 and u < min(1.0, p / q):
            continue
        if draft_probs is not None:
            residual = (probs[i] - draft_probs[i]).clamp(min=0)
        else:
            residual = probs[i].clone()
            residual[token] = 0.0
        total = float(residual.sum())
        residual = residual / total if total > 0 else probs[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return k, int(torch.multinomial(probs[k], 1, generator=generator))


def accept_greedy(targets: Sequence[int], draft: Sequence[int]) -> tuple[int, int]:
    """Greedy verification: the draft's longest prefix equal to the model's argmax tokens, and the next."""
    n = 0
    while n < len(draft) and draft[n] == targets[n]:
        n += 1
    return n, int(targets[n])


# --- draft length ---


@dataclass
class DraftLength:
    """Adaptive draft length: the k that maximises expected tokens per unit of round time.

    With per-token acceptance a, a round with k draft tokens yields (1 - a^(k+1)) / (1 - a) tokens on
    average and costs 1 + k * token_cost; `acceptance` is a running average of what was observed. Below
    about token_cost, no draft pays: k drops to 0 and a one-token probe every probe_every rounds keeps
    measuring.
    """

    config: SpeculationConfig = field(default_factory=SpeculationConfig)
    acceptance: float = 0.5
    smoothing: float = 0.3

    def __post_init__(self):
        self.k = self.config.initial_draft
        self._idle = 0

    def next(self) -> int:
        """The draft length for the next round: k, or a one-token probe after probe_every idle rounds."""
        if self.k > 0:
            return self.k
        self._idle += 1
        if self._idle >= self.config.probe_every:
            self._idle = 0
            return 1
        return 0

    def update(
        self,
        drafted: int,
        accepted: int,
        token_cost: float | None = None,
        round_cost: Callable[[int], float] | None = None,
    ) -> None:
        """Fold in a round's acceptance; `token_cost` (learned) replaces the config's prior when given, and
        `round_cost(rows)` (RoundCost.relative), when given, prices each draft length as measured."""
        if drafted > 0:
            rate = accepted / drafted
            self.acceptance = (1 - self.smoothing) * self.acceptance + self.smoothing * rate
        elif token_cost is None:
            return
        self.k = best_draft_length(self.acceptance, self.config, token_cost, round_cost)


def expected_tokens(acceptance: float, k: int) -> float:
    """Mean tokens a round of k draft tokens yields when each is accepted with probability `acceptance`."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


def best_draft_length(
    acceptance: float,
    config: SpeculationConfig,
    token_cost: float | None = None,
    round_cost: Callable[[int], float] | None = None,
) -> int:
    """The draft length in [min_draft, max_draft] with the most expected tokens per round time.

    `token_cost`: the time one more token adds to a round, relative to a one-token round (default: the
    config's prior). `round_cost(rows)`: a round of `rows` tokens relative to a one-token round, where it
    is known better than a straight line (RoundCost.relative); it overrides `token_cost`."""
    acceptance = min(max(acceptance, 0.0), 1.0)
    cost = config.token_cost if token_cost is None else token_cost
    best, best_rate = config.min_draft, -math.inf
    for k in range(config.min_draft, config.max_draft + 1):
        relative = round_cost(k + 1) if round_cost is not None else 1 + k * cost
        rate = expected_tokens(acceptance, k) / relative
        if rate > best_rate + 1e-12:
            best, best_rate = k, rate
    return best


class RoundCost:
    """Learns what one more draft token costs, relative to a one-token round, from the rounds themselves.

    A round of n tokens through the swarm takes about base + n * per_token (a least-squares line over the
    recent rounds, older ones fading by `decay`); drafting costs draft_time per draft token on the client.
    The ratio (per_token + draft_time) / (base + per_token) is what `best_draft_length` weighs: small on a
    WAN with GPU servers, large on CPU servers on loopback or with a slow drafter. Until two different round
    sizes have been seen, the per-token share is the prior's.

    A line misprices steps whose cost rises in stairs (CPU servers: a round of 2 tokens costs what one does,
    3 cost 15% more, 5-8 alike), so `relative(rows)` uses each size's own mean time where it has been seen:
    otherwise the stair after 2 rows makes every draft look dear and drafting stops.
    """

    def __init__(self, prior: float, decay: float = 0.9):
        self.prior = prior
        self.decay = decay
        self._sums = [0.0] * 5  # weight, x, y, xx, xy
        self._sizes: dict[int, list[float]] = {}  # round size -> [weight, seconds] (fading likewise)
        self._draft = [0.0, 0.0]  # draft tokens, seconds (fading likewise)

    def observe(self, sent: int, seconds: float, drafted: int = 0, draft_seconds: float = 0.0) -> None:
        """One round: `sent` tokens through the swarm in `seconds`, after drafting `drafted` tokens."""
        if drafted > 0:
            self._draft = [self.decay * self._draft[0] + drafted, self.decay * self._draft[1] + draft_seconds]
        w, x, y, xx, xy = (self.decay * value for value in self._sums)
        self._sums = [w + 1, x + sent, y + seconds, xx + sent * sent, xy + sent * seconds]
        for size in self._sizes.values():
            size[0] *= self.decay
            size[1] *= self.decay
        size = self._sizes.setdefault(sent, [0.0, 0.0])
        size[0] += 1
        size[1] += seconds

    @property
    def token_cost(self) -> float:
        line = self._line()
        if line is None:
            return self.prior
        per_token, one_token_round = line
        return min((per_token + self._draft_seconds()) / one_token_round, 10.0)

    def relative(self, rows: int) -> float:
        """A round of `rows` tokens (drafting included) relative to a one-token round: from that size's own
        mean time once it was seen (against the one-token rounds' mean, or the line's when there were none),
        else the straight line of `token_cost`."""
        size, line = self._sizes.get(rows), self._line()
        if rows == 1 or size is None or size[0] < 0.5 or line is None:
            return 1 + (rows - 1) * self.token_cost
        one = self._sizes.get(1)
        one_token_round = one[1] / one[0] if one is not None and one[0] >= 0.5 else line[1]
        seconds = size[1] / size[0] + (rows - 1) * self._draft_seconds()
        return min(seconds / max(one_token_round, 1e-6), 10.0)

    def _line(self) -> tuple[float, float] | None:
        """(seconds per extra token, seconds of a one-token round) of the fitted line; None before any."""
        w, x, y, xx, xy = self._sums
        if w <= 0:
            return None
        mean_x, mean_y = x / w, y / w
        variance = xx / w - mean_x**2
        if len(self._sizes) < 2 or variance < 1e-9:
            per_token = self.prior * mean_y / (1 + self.prior * (mean_x - 1))
        else:
            per_token = max((xy / w - mean_x * mean_y) / variance, 0.0)
        return per_token, max(mean_y - per_token * (mean_x - 1), 1e-6)

    def _draft_seconds(self) -> float:
        return self._draft[1] / self._draft[0] if self._draft[0] > 0 else 0.0


# --- the decode loop ---


class SpeculativeModel(Protocol):
    def session_logits_all(
        self,
        session: Any,
        input_ids: torch.Tensor,
        *,
        start_from_position: int | None = None,
        last: int | None = None,
    ) -> torch.Tensor:
        """Feed new tokens (after cutting the cache back to start_from_position); logits at the last ones."""

    def can_roll_back(self, session: Any) -> bool: ...

    # Only for feature drafters: `session_logits_all`'s logits and the last block's outputs at every new
    # position [batch, tokens, hidden] (before the final norm).
    # def session_forward(self, session, input_ids, *, start_from_position=None, last=None)


def speculative_rounds(
    model: SpeculativeModel,
    session: Any,
    history: torch.Tensor,
    pending: torch.Tensor,
    params: SamplingParams,
    config: SpeculationConfig,
    stats: SpeculationStats,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    drafter: Drafter | FeatureDrafter | None = None,
    held: int | None = None,
) -> Iterator[list[int]]:
    """Yield the tokens of each round (batch 1); the caller stops the iterator when it has enough.

    `history` [1, n] is every token so far (the conversation), `pending` [1, m >= 1] its tail the servers
    have not seen (`held`, default session.position, is where it starts: anything the servers hold past
    it is rolled back). Each round the servers first forget the previous round's rejected draft tokens.
    """
    if history.shape[0] != 1:
        raise ValueError("speculative decoding runs one sequence at a time (batch 1)")
    drafter = drafter or config.drafter
    if drafter is None:
        if config.draft_model is not None:
            drafter = DraftModelDrafter(config.draft_model, params)
        elif config.tree_rows > 0:
            drafter = NgramTreeDrafter(PromptLookupDrafter(config.max_ngram), None, config.max_ngram)
        else:
            drafter = PromptLookupDrafter(config.max_ngram)
    kept_position = session.position if held is None else held  # what the servers hold and we keep
    features = None  # the last block's outputs at the verified positions, for a feature drafter
    if wants_features(drafter):
        if not hasattr(model, "session_forward"):
            raise TypeError(f"{type(model).__name__} returns no hidden states: a feature drafter needs them")
        features = session_features(session, kept_position)
        if features is None:  # earlier turns kept none: this generation drafts by prompt lookup instead
            drafter = PromptLookupDrafter(config.max_ngram)
    stats.drafter = getattr(drafter, "name", None) or ("feature" if features is not None else None)
    stats.drafter = stats.drafter or type(drafter).__name__
    lengths: dict[Any, DraftLength] = {}  # by kind of proposal (prompt lookup: its match length)
    propose = getattr(drafter, "propose", None)
    # Trees: greedy only (sampling keeps chains and speculative sampling), where the model can send them.
    trees = getattr(drafter, "propose_tree", None) is not None and hasattr(model, "can_take_trees")
    trees = trees and config.tree_rows > 0 and not params.sampling
    cost = RoundCost(config.token_cost) if config.learn_cost else None
    tokens = history[0].tolist()
    pending_ids = pending[0].tolist()
    produced = 0
    while True:
        room = session.max_length - kept_position - len(pending_ids)
        limit = max(min(room, max_new_tokens - produced - 1), 0)
        draft, draft_probs, kind, k = [], None, None, 0
        copied = False  # a prompt-lookup copy stands in for the model drafter this round (no drafting time)
        started = time.perf_counter()
        if limit > 0 and trees and len(pending_ids) == 1 and model.can_take_trees(session):
            rollback = kept_position if kept_position < session.position else None
            verified = (rollback, kept_position, features)
            new = _tree_round(
                model, session, drafter, tokens, pending_ids, verified, params, config, cost, stats, limit
            )
            if new is not None:
                kept_position += len(new)  # the pending token and the kept path
                produced += len(new)
                tokens.extend(new)
                pending_ids = [new[-1]]
                yield new
                continue
        if limit > 0 and model.can_roll_back(session):
            if propose is not None:  # a free proposal first; its kind decides how much of it to send
                draft, draft_probs, kind = propose(tokens, min(limit, config.max_draft))
                if draft:
                    k = min(lengths.setdefault(kind, DraftLength(config)).next(), limit)
            elif len(pending_ids) == 1:  # a model drafter would read the whole prompt before its prefill
                if features is not None and config.lookup_min_match > 0:
                    # A long enough copy from the conversation is free and often right: its own kind.
                    copy, n = prompt_lookup_match(tokens, min(limit, config.max_draft), config.max_ngram)
                    if n >= config.lookup_min_match:
                        kind = ("lookup", n)
                        k = min(lengths.setdefault(kind, DraftLength(config)).next(), limit)
                        draft, copied = (copy, True) if k > 0 else ([], False)
                if not draft:
                    kind = None
                    k = min(lengths.setdefault(kind, DraftLength(config)).next(), limit)
                    if k > 0 and features is not None:
                        draft, draft_probs = drafter.draft_with_features(tokens, features.view(), k)
                    elif k > 0:
                        draft, draft_probs = drafter.draft(tokens, k)
        drafted_at = time.perf_counter()
        draft = list(draft[:k])
        if draft_probs is not None:
            draft_probs = draft_probs[: len(draft)]
        sent = torch.tensor([pending_ids + draft], dtype=torch.int64)
        rollback = kept_position if kept_position < session.position else None
        needed = len(draft) + 1  # the last pending token's and each draft token's
        if features is None:
            logits = model.session_logits_all(session, sent, start_from_position=rollback, last=needed)[0]
        else:
            logits, hidden = model.session_forward(session, sent, start_from_position=rollback, last=needed)
            logits, hidden = logits[0], hidden[0]
            features.truncate(kept_position)  # past the previous round's rejected tokens (never appended)
        logits = logits[-needed:].float()  # [len(draft) + 1, vocab]
        contexts = [torch.tensor([tokens + draft[:i]], dtype=torch.int64) for i in range(len(draft) + 1)]
        if params.sampling:
            rows = [target_probs(logits[i : i + 1], contexts[i], params) for i in range(len(draft) + 1)]
            n, token = accept_draft(torch.cat(rows), draft, draft_probs, generator)
        else:
            penalty = params.repetition_penalty
            targets = [
                int(apply_repetition_penalty(logits[i : i + 1], contexts[i], penalty).argmax())
                for i in range(len(draft) + 1)
            ]
            n, token = accept_greedy(targets, draft)
        if cost is not None and len(pending_ids) == 1:  # a prompt's prefill is not a round to learn from
            drafted = 0 if copied else len(draft)  # the drafter's own time per token, not diluted by copies
            cost.observe(sent.shape[1], time.perf_counter() - drafted_at, drafted, drafted_at - started)
        stats.rounds += 1
        stats.drafted += len(draft)
        stats.accepted += n
        stats.fallback_rounds += not draft
        if kind in lengths:
            if cost is not None:
                lengths[kind].update(len(draft), n, cost.token_cost, cost.relative)
            else:
                lengths[kind].update(len(draft), n)
        new = [*draft[:n], token]
        if features is not None:  # the verified rows: the pending tokens and the accepted draft
            features.append(hidden[: len(pending_ids) + n])
        kept_position += len(pending_ids) + n
        produced += len(new)
        tokens.extend(new)
        pending_ids = [token]
        yield new


def _tree_round(model, session, drafter, tokens, pending_ids, verified, params, config, cost, stats, limit):
    """One round with a token tree (draft_tree.py): the new tokens (the kept path's and the model's next),
    or None when no tree was proposed or a server of the route turned out to take none (the caller then
    runs an ordinary round)."""
    from engine.client.inference_session import TreeStepsUnsupportedError

    rollback, kept_position, features = verified  # where the servers cut back to; what they keep; features
    started = time.perf_counter()
    if cost is None:
        row_cost = config.token_cost
    else:  # the measured time of each round size (a line through them misprices stairs), or the line
        row_cost = cost.relative if config.tree_cost == "measured" else cost.token_cost
    max_rows = min(config.tree_rows, limit)
    if features is None:
        tree = drafter.propose_tree(tokens, max_rows, row_cost)
    else:  # a feature drafter's tree, from the last block's outputs at the verified positions
        tree = drafter.propose_tree(tokens, max_rows, row_cost, features.view())
    if len(tree) == 0:
        return None
    if len(tree) > max_rows:  # parents come before their children: the first rows are a tree too
        tree = DraftTree(tree.tokens[:max_rows], tree.parents[:max_rows], tree.kinds[:max_rows])
    drafted_at = time.perf_counter()
    sent = torch.tensor([pending_ids + tree.tokens], dtype=torch.int64)
    step = model.session_forward if features is not None else model.session_logits_all
    try:
        output = step(
            session, sent, start_from_position=rollback, last=len(tree) + 1, tree_parents=tree.parents
        )
    except TreeStepsUnsupportedError:
        return None
    logits, hidden = output if features is not None else (output, None)
    logits = logits[0].float()
    penalty = params.repetition_penalty
    targets = []
    for row in range(len(tree) + 1):  # row 0: the pending token; row 1 + i: tree row i
        context = tokens + [tree.tokens[r] for r in tree.path(row - 1)] if row else tokens
        context_ids = torch.tensor([context], dtype=torch.int64)
        targets.append(int(apply_repetition_penalty(logits[row : row + 1], context_ids, penalty).argmax()))
    path, token = verify_greedy(tree, targets)
    model.accept_tree(session, path)
    if features is not None:  # the verified rows: the pending token and the kept path
        features.truncate(kept_position)
        features.append(hidden[0, [0, *(1 + r for r in path)]])
    drafter.observe(tree, path)
    if cost is not None:
        cost.observe(sent.shape[1], time.perf_counter() - drafted_at, len(tree), drafted_at - started)
    stats.rounds += 1
    stats.tree_rounds += 1
    stats.drafted += len(tree)
    stats.accepted += len(path)
    return [*(tree.tokens[r] for r in path), token]
