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
) -> Iterator[GenerationStep]:
    """Yield one `GenerationStep` per new token as soon as the swarm computes it.

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
        pending = history[:, session.position :]
        needed = session.position + pending.shape[1] + max(params.max_new_tokens - 1, 0)
        if needed > session.max_length:
            raise ValueError(
                f"session too short: {session.position} cached + {pending.shape[1]} new + "
                f"{params.max_new_tokens} to generate needs max_length >= {needed}, has {session.max_length}"
            )
        yield from _decode_loop(model, session, history, pending, params, tokenizer)


@contextlib.contextmanager
def _closing(session):
    try:
        yield session
    finally:
        session.close()


def _decode_loop(model, session, history, pending, params, tokenizer) -> Iterator[GenerationStep]:
    batch = history.shape[0]
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    finished = torch.zeros(batch, dtype=torch.bool)
    eos = torch.tensor(params.eos_ids, dtype=torch.int64)
    prompt_length = history.shape[1]
    texts = [""] * batch
    session.output_ids = history
    for index in range(params.max_new_tokens):
        logits = model.session_logits(session, pending)
        tokens = next_tokens(logits, history, params, generator)
        tokens = torch.where(finished, torch.full_like(tokens, params.pad_id), tokens)
        history = torch.cat([history, tokens[:, None]], dim=1)
        session.output_ids = history  # before yielding: a consumer that stops here leaves it consistent
        if eos.numel():
            finished = finished | torch.isin(tokens, eos)
        new_text = None
        if tokenizer is not None:
            decoded = [tokenizer.decode(row[prompt_length:], skip_special_tokens=True) for row in history]
            if params.stop:
                stopped = [find_stop(text, params.stop) is not None for text in decoded]
                finished = finished | torch.tensor(stopped)
            final = index == params.max_new_tokens - 1 or bool(finished.all())
            new_text = []
            for row, text in enumerate(decoded):
                if text.endswith("\ufffd") and not final:
                    new_text.append("")  # half of a multi-byte character: wait for the rest
                else:
                    new_text.append(text[len(texts[row]) :] if text.startswith(texts[row]) else text)
                    texts[row] = text
            new_text = tuple(new_text)
        yield GenerationStep(tokens=tokens, finished=finished.clone(), text=new_text)
        if bool(finished.all()):
            return
        pending = tokens[:, None]


def generate(
    model: GenerativeModel,
    input_ids: torch.Tensor | None,
    params: SamplingParams | None = None,
    *,
    session: SessionLike | None = None,
    tokenizer: Any = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prompt plus generated tokens [batch, prompt + new], like transformers' `generate`.

    With a `session` reused across turns, the result holds this turn's input and its new tokens only.
    """
    steps = stream_generate(
        model, input_ids, params, session=session, tokenizer=tokenizer, attention_mask=attention_mask
    )
    tokens = [step.tokens for step in steps]
    prompt = torch.as_tensor(input_ids, dtype=torch.int64) if input_ids is not None else None
    if prompt is not None and prompt.ndim == 1:
        prompt = prompt[None]
    new = torch.stack(tokens, dim=1) if tokens else torch.empty(0, 0, dtype=torch.int64)
    if prompt is None:
        return new
    return torch.cat([prompt, new.reshape(prompt.shape[0], -1)], dim=1)
