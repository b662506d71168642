"""Choosing the next token from logits: greedy or sampling, with the usual warpers, and stop strings.

The order of the warpers follows transformers' `generate` (repetition penalty, then temperature, top-k,
top-p), so greedy decoding here picks exactly the tokens transformers picks on the same logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; validated on construction.

    As in transformers, decoding is greedy unless `do_sample=True`; `temperature == 0` is greedy too.
    `stop` holds strings checked on the decoded text of the new tokens; `eos_token_id` ends a row (None:
    never).
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None  # written after a row finished (default: the first eos id, else 0)

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop sequences must be non-empty strings")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def sampling(self) -> bool:
        """True if tokens are drawn at random, False for greedy decoding."""
        return self.do_sample and self.temperature > 0

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def pad_id(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_ids[0] if self.eos_ids else 0


def apply_repetition_penalty(
    logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Make tokens seen in `previous_ids` less likely (transformers' RepetitionPenaltyLogitsProcessor)."""
    if penalty == 1.0 or previous_ids.numel() == 0:
        return logits
    score = torch.gather(logits, 1, previous_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, previous_ids, score)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.shape[-1])
    threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, -float("inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (at least one token)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    remove = remove.scatter(1, sorted_indices, remove)
    return logits.masked_fill(remove, -float("inf"))


def next_tokens(
    logits: torch.Tensor,
    previous_ids: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from last-position `logits` [batch, vocab]; returns int64 [batch]."""
    logits = logits.float()
    logits = apply_repetition_penalty(logits, previous_ids, params.repetition_penalty)
    if not params.sampling:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p is not None:
        logits = apply_top_p(logits, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index in `text` where the earliest stop string begins, or None."""
    positions = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(positions) if positions else None


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the first stop string."""
    index = find_stop(text, stops)
    return text if index is None else text[:index]


def streamable_text(text: str, stops: Sequence[str]) -> str:
    """The part of `text` safe to show now: cut at a stop string, minus a tail that may start one."""
    text = truncate_at_stop(text, stops)
    hold = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:length]):
                hold = length
                break
    return text[: len(text) - hold]
