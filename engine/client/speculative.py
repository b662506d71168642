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
and, optionally, a small local causal LM sharing the tokenizer. The draft length adapts to the observed
acceptance rate (`DraftLength`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

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
    token_cost: float = 0.05
    draft_model: Any = None  # an optional local causal LM (transformers) with the same tokenizer
    drafter: Any = None  # any object with Drafter's `draft` (overrides both of the above)

    def __post_init__(self):
        if not 0 <= self.min_draft <= self.initial_draft <= self.max_draft or self.initial_draft < 1:
            raise ValueError("need 0 <= min_draft <= initial_draft <= max_draft and initial_draft >= 1")
        if self.probe_every < 1:
            raise ValueError("probe_every must be >= 1")
        if self.max_ngram < 1 or self.token_cost < 0:
            raise ValueError("max_ngram must be >= 1 and token_cost >= 0")


@dataclass
class SpeculationStats:
    """What speculation did in one generation (reported in the API's timings and the bench)."""

    rounds: int = 0  # inference steps through the swarm
    tokens: int = 0  # tokens produced
    drafted: int = 0  # draft tokens sent for verification
    accepted: int = 0  # draft tokens the full model agreed with
    fallback_rounds: int = 0  # rounds without a draft (nothing to propose, or a route that cannot roll back)

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
        )


# --- drafters ---


class Drafter(Protocol):
    def draft(self, history: Sequence[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to k tokens to follow `history`, and their draft distributions [n, vocab] (None: point mass)."""


class PromptLookupDrafter:
    """Drafts by looking up the last n tokens earlier in the conversation and copying what followed."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def draft(self, history: Sequence[int], k: int) -> tuple[list[int], None]:
        return prompt_lookup(history, k, self.max_ngram), None


def prompt_lookup(history: Sequence[int], k: int, max_ngram: int = 3) -> list[int]:
    """The k tokens after the latest earlier occurrence of history's last n tokens (n = max_ngram..1)."""
    history = list(history)
    size = len(history)
    for n in range(min(max_ngram, size - 1), 0, -1):
        tail = history[size - n :]
        for start in range(size - n - 1, -1, -1):  # latest occurrence first: recent context predicts best
            if history[start : start + n] == tail:
                follow = history[start + n : start + n + k]
                if follow:
                    return follow
    return []


class DraftModelDrafter:
    """Drafts greedily with a small local causal LM (transformers) that shares the target's tokenizer.

    It re-reads the whole history each round (no cache kept across rounds): simple and always consistent
    with rollbacks; fine for draft models small enough to be worth using here.
    """

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

    def update(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        rate = accepted / drafted
        self.acceptance = (1 - self.smoothing) * self.acceptance + self.smoothing * rate
        self.k = best_draft_length(self.acceptance, self.config)


def expected_tokens(acceptance: float, k: int) -> float:
    """Mean tokens a round of k draft tokens yields when each is accepted with probability `acceptance`."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


def best_draft_length(acceptance: float, config: SpeculationConfig) -> int:
    """The draft length in [min_draft, max_draft] with the most expected tokens per round time."""
    acceptance = min(max(acceptance, 0.0), 1.0)
    best, best_rate = config.min_draft, -math.inf
    for k in range(config.min_draft, config.max_draft + 1):
        rate = expected_tokens(acceptance, k) / (1 + k * config.token_cost)
        if rate > best_rate + 1e-12:
            best, best_rate = k, rate
    return best


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
    drafter: Drafter | None = None,
) -> Iterator[list[int]]:
    """Yield the tokens of each round (batch 1); the caller stops the iterator when it has enough.

    `history` [1, n] is every token so far (the conversation), `pending` [1, m >= 1] its tail the servers
    have not seen. Each round the servers first forget the previous round's rejected draft tokens.
    """
    if history.shape[0] != 1:
        raise ValueError("speculative decoding runs one sequence at a time (batch 1)")
    drafter = drafter or config.drafter
    if drafter is None:
        drafter = (
            DraftModelDrafter(config.draft_model, params)
            if config.draft_model is not None
            else PromptLookupDrafter(config.max_ngram)
        )
    length = DraftLength(config)
    tokens = history[0].tolist()
    pending_ids = pending[0].tolist()
    kept_position = session.position  # what the servers hold and we keep
    produced = 0
    while True:
        room = session.max_length - kept_position - len(pending_ids)
        k = max(min(length.next(), room, max_new_tokens - produced - 1), 0)
        draft, draft_probs = [], None
        if k > 0 and model.can_roll_back(session):
            draft, draft_probs = drafter.draft(tokens, k)
        draft = list(draft[:k])
        if draft_probs is not None:
            draft_probs = draft_probs[: len(draft)]
        sent = torch.tensor([pending_ids + draft], dtype=torch.int64)
        rollback = kept_position if kept_position < session.position else None
        needed = len(draft) + 1  # the last pending token's and each draft token's
        logits = model.session_logits_all(session, sent, start_from_position=rollback, last=needed)[0]
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
        stats.rounds += 1
        stats.drafted += len(draft)
        stats.accepted += n
        stats.fallback_rounds += not draft
        length.update(len(draft), n)
        new = [*draft[:n], token]
        kept_position += len(pending_ids) + n
        produced += len(new)
        tokens.extend(new)
        pending_ids = [token]
        yield new
