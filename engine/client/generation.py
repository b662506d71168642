"""Token generation over an inference session: a streaming iterator and a whole-tensor convenience.

Batches: the servers run causal attention without padding masks (as in Petals, whose `generate` passes no
mask to the servers either), so rows of a batch must be prompts of equal length; there is no left padding.

Multi-turn: pass the same `session` to successive calls. Each call sends only what the servers have not
seen (the last token of the previous turn plus the new prompt), so their KV caches are reused; the
session's `output_ids` keeps the whole conversation for the repetition penalty.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.client.sampling import SamplingParams, find_stop, next_tokens
from engine.client.speculative import SpeculationConfig, SpeculationStats, speculative_rounds


class SessionLike(Protocol):
    position: int
    max_length: int
    output_ids: torch.Tensor | None

    def close(self) -> None: ...


class GenerativeModel(Protocol):
    """What generation needs from a model: sessions, and last-position logits for new tokens."""

    def inference_session(self, *, max_length: int) -> SessionLike: ...

    def session_logits(self, session: SessionLike, input_ids: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class GenerationStep:
    """One generated token per row; `finished[i]` is True once row i ended (eos, stop string or limit)."""

    tokens: torch.Tensor  # int64 [batch]
    finished: torch.Tensor  # bool [batch]
    text: tuple[str, ...] | None = None  # new text per row since the previous step (with a tokenizer)


def stream_generate(
    model: GenerativeModel,
    input_ids: torch.Tensor | None,
    params: SamplingParams | None = None,
    *,
    session: SessionLike | None = None,
    tokenizer: Any = None,
    attention_mask: torch.Tensor | None = None,
    speculation: SpeculationConfig | None = None,
    stats: SpeculationStats | None = None,
) -> Iterator[GenerationStep]:
    """Yield one `GenerationStep` per new token as soon as the swarm computes it.

    With `speculation` (batch 1, a model with `session_logits_all`), tokens come from speculative rounds
    (engine.client.speculative): same greedy tokens, same sampling distribution, fewer trips through the
    swarm; `stats` then counts rounds and accepted draft tokens.

    `input_ids` [batch, tokens] is the prompt, or (with a `session` that already ran) the new tokens of
    the next turn; None continues from the session's last token. Without a `session`, one is opened with
    room for prompt + max_new_tokens and closed when the iterator ends. Stop strings need `tokenizer`.
    """
    params = params or SamplingParams()
    if params.stop and tokenizer is None:
        raise ValueError("stop sequences are checked on decoded text: pass a tokenizer")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "padded batches are not supported: the servers apply no padding mask (as in Petals); "
            "send prompts of equal length, or one prompt per call"
        )
    previous = session.output_ids if session is not None else None
    if input_ids is None:
        if previous is None:
            raise ValueError("input_ids is required to start a generation")
        input_ids = previous[:, :0]
    input_ids = torch.as_tensor(input_ids, dtype=torch.int64)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if previous is not None and previous.shape[0] != input_ids.shape[0]:
        raise ValueError(f"session holds {previous.shape[0]} rows, input_ids has {input_ids.shape[0]}")
    history = input_ids if previous is None else torch.cat([previous, input_ids], dim=1)
    if history.shape[1] == 0:
        raise ValueError("nothing to condition on: input_ids is empty")

    with contextlib.ExitStack() as stack:
        if session is None:
            max_length = history.shape[1] + max(params.max_new_tokens - 1, 0)
            session = stack.enter_context(_closing(model.inference_session(max_length=max(max_length, 1))))
        # What the servers hold of this conversation: a speculative round that ended the previous turn early
        # (eos, a stop string) may have left draft tokens past it, which this turn's first step rolls back.
        held = session.position if previous is None else min(session.position, previous.shape[1] - 1)
        pending = history[:, held:]
        needed = held + pending.shape[1] + max(params.max_new_tokens - 1, 0)
        if needed > session.max_length:
            raise ValueError(
                f"session too short: {held} cached + {pending.shape[1]} new + "
                f"{params.max_new_tokens} to generate needs max_length >= {needed}, has {session.max_length}"
            )
        if speculation is not None and history.shape[0] == 1 and hasattr(model, "session_logits_all"):
            stats = stats if stats is not None else SpeculationStats()
            yield from _speculative_loop(
                model, session, history, pending, params, tokenizer, speculation, stats, held
            )
        else:
            yield from _decode_loop(model, session, history, pending, params, tokenizer, held)


@contextlib.contextmanager
def _closing(session):
    try:
        yield session
    finally:
        session.close()


class _Emitter:
    """Turns each round's tokens into GenerationSteps: history, eos, stop strings, incremental text."""

    def __init__(self, session, history, params, tokenizer):
        self.session, self.history, self.params, self.tokenizer = session, history, params, tokenizer
        batch = history.shape[0]
        self.finished = torch.zeros(batch, dtype=torch.bool)
        self.eos = torch.tensor(params.eos_ids, dtype=torch.int64)
        self.prompt_length = history.shape[1]
        self.texts = [""] * batch
        self.count = 0
        session.output_ids = history

    @property
    def done(self) -> bool:
        return bool(self.finished.all()) or self.count >= self.params.max_new_tokens

    def emit(self, tokens: torch.Tensor) -> GenerationStep:
        params, tokenizer = self.params, self.tokenizer
        tokens = torch.where(self.finished, torch.full_like(tokens, params.pad_id), tokens)
        self.history = torch.cat([self.history, tokens[:, None]], dim=1)
        self.session.output_ids = self.history  # before yielding: a consumer that stops leaves it consistent
        self.count += 1
        if self.eos.numel():
            self.finished = self.finished | torch.isin(tokens, self.eos)
        new_text = None
        if tokenizer is not None:
            start = self.prompt_length
            decoded = [tokenizer.decode(row[start:], skip_special_tokens=True) for row in self.history]
            if params.stop:
                stopped = [find_stop(text, params.stop) is not None for text in decoded]
                self.finished = self.finished | torch.tensor(stopped)
            final = self.count == params.max_new_tokens or bool(self.finished.all())
            new_text = []
            for row, text in enumerate(decoded):
                if text.endswith("\ufffd") and not final:
                    new_text.append("")  # half of a multi-byte character: wait for the rest
                else:
                    previous = self.texts[row]
                    new_text.append(text[len(previous) :] if text.startswith(previous) else text)
                    self.texts[row] = text
            new_text = tuple(new_text)
        return GenerationStep(tokens=tokens, finished=self.finished.clone(), text=new_text)


def _decode_loop(model, session, history, pending, params, tokenizer, held) -> Iterator[GenerationStep]:
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    emitter = _Emitter(session, history, params, tokenizer)
    while not emitter.done:
        if held < session.position:  # only after a speculative turn, so the model can roll back
            logits = model.session_logits_all(session, pending, start_from_position=held, last=1)[:, -1]
        else:
            logits = model.session_logits(session, pending)
        held = session.position
        tokens = next_tokens(logits, emitter.history, params, generator)
        step = emitter.emit(tokens)
        yield step
        pending = step.tokens[:, None]


def _speculative_loop(
    model, session, history, pending, params, tokenizer, speculation, stats, held
) -> Iterator[GenerationStep]:
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    emitter = _Emitter(session, history, params, tokenizer)
    rounds = speculative_rounds(
        model,
        session,
        history,
        pending,
        params,
        speculation,
        stats,
        max_new_tokens=params.max_new_tokens,
        generator=generator,
        held=held,
    )
    for new in rounds:
        for token in new:
            stats.tokens += 1
            yield emitter.emit(torch.tensor([token], dtype=torch.int64))
            if emitter.done:
                return


def generate(
    model: GenerativeModel,
    input_ids: torch.Tensor | None,
    params: SamplingParams | None = None,
    *,
    session: SessionLike | None = None,
    tokenizer: Any = None,
    attention_mask: torch.Tensor | None = None,
    speculation: SpeculationConfig | None = None,
    stats: SpeculationStats | None = None,
) -> torch.Tensor:
    """Prompt plus generated tokens [batch, prompt + new], like transformers' `generate`.

    With a `session` reused across turns, the result holds this turn's input and its new tokens only.
    """
    steps = stream_generate(
        model,
        input_ids,
        params,
        session=session,
        tokenizer=tokenizer,
        attention_mask=attention_mask,
        speculation=speculation,
        stats=stats,
    )
    tokens = [step.tokens for step in steps]
    prompt = torch.as_tensor(input_ids, dtype=torch.int64) if input_ids is not None else None
    if prompt is not None and prompt.ndim == 1:
        prompt = prompt[None]
    new = torch.stack(tokens, dim=1) if tokens else torch.empty(0, 0, dtype=torch.int64)
    if prompt is None:
        return new
    return torch.cat([prompt, new.reshape(prompt.shape[0], -1)], dim=1)
