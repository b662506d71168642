"""Generation requests, their events, and streaming text: incremental decoding and stop sequences."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationRequest:
    """One completion: a chat (`messages`, rendered with the model's chat template) or a raw `prompt`."""

    model: str
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content)
    prompt: str | None = None
    max_tokens: int | None = None  # None: up to the model's context
    temperature: float = 1.0  # 0: greedy
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Fit the model's context: leave out the oldest turns (never the system prompt nor the last message)
    # and lower max_tokens to what remains, instead of refusing the request. Started says what was done.
    fit_context: bool = False

    def __post_init__(self) -> None:
        assert (self.messages is None) != (self.prompt is None), "give messages or prompt"


@dataclass(frozen=True)
class Started:
    """The inference session is open; generation follows."""

    prompt_tokens: int
    context_length: int = 0  # the longest prompt + reply the engine runs for this model
    max_tokens: int = 0  # new tokens this request may produce (after fitting the context)
    dropped_messages: int = 0  # oldest turns left out to fit the context (fit_context only)


@dataclass(frozen=True)
class TextDelta:
    """New text (whole characters; a stop sequence is never split across deltas)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end: why, and how many tokens went in and came out."""

    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    # Speed figures (see engine.service.generation.timings): time to first token, decode rate, speculation.
    timings: dict | None = None


GenerationEvent = Started | TextDelta | Finished


def eos_ids(model_config, tokenizer) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (getattr(model_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, int) and item not in ids:
                ids.append(item)
    return tuple(ids)


class IncrementalDecoder:
    """New text as tokens arrive; a token that ends in half a character waits for the rest (or the end)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sent = ""

    def _new(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding changed earlier text (rare): send only what is new
            same = next(
                (i for i, (a, b) in enumerate(zip(text, self.sent, strict=False)) if a != b),
                min(len(text), len(self.sent)),
            )
            text, self.sent = text[same:], text
            return text
        new, self.sent = text[len(self.sent) :], text
        return new

    def step(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return "" if text.endswith("\ufffd") else self._new(text)

    def finish(self, ids: list[int]) -> str:
        """Whatever is still unsent when generation ends (such as a final half character)."""
        return self._new(self.tokenizer.decode(ids, skip_special_tokens=True)) if ids else ""


class TextHoldback:
    """Streams text while watching for stop sequences: text that could begin a stop is held back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._pending = ""
        self._done = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop sequence was reached)."""
        if self._done:
            return "", True
        self._pending += piece
        if not self.stops:
            out, self._pending = self._pending, ""
            return out, False
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._pending, self._done = self._pending[: min(hits)], "", True
            return out, True
        keep = 0  # the longest tail of the pending text that is a prefix of some stop sequence
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self._pending)), keep, -1):
                if self._pending.endswith(stop[:length]):
                    keep = length
                    break
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        return out, False

    def flush(self) -> str:
        """What is still held back when generation ends without reaching a stop."""
        out, self._pending = ("" if self._done else self._pending), ""
        return out
