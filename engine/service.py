"""EngineService: the long-lived engine behind `pollinate-engine run` (DHT peer, swarm client, block hosts).

It owns the lifecycle of its parts, the hosting state machine (idle -> loading -> serving -> draining ->
idle, or error), counters for /api/stats and a fan-out of status/stats events. It knows nothing of HTTP:
failures are ServiceErrors with a `type` that engine.api maps to status codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ---- errors: "this request failed" (the engine lives on) ------------------------------------------------


class ServiceError(Exception):
    """A request the service cannot honour; `type` names the kind (docs/API.md, Errors)."""

    type = "internal_error"

    def extra(self) -> dict[str, Any]:
        """Extra fields for the JSON error body."""
        return {}


class InvalidRequestError(ServiceError):
    type = "invalid_request"


class ModelNotFoundError(ServiceError):
    type = "model_not_found"


class WrongStateError(ServiceError):
    type = "wrong_state"


class SwarmUnavailableError(ServiceError):
    """The swarm cannot serve the model now (blocks without a server), or the engine is not ready yet."""

    type = "swarm_unavailable"

    def __init__(self, message: str, missing_blocks: tuple[int, ...] | list[int] = ()):
        super().__init__(message)
        self.missing_blocks = [int(b) for b in missing_blocks]

    def extra(self) -> dict[str, Any]:
        return {"missing_blocks": self.missing_blocks} if self.missing_blocks else {}


# ---- generation requests and their events ---------------------------------------------------------------


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

    def __post_init__(self) -> None:
        assert (self.messages is None) != (self.prompt is None), "give messages or prompt"


@dataclass(frozen=True)
class Started:
    """The inference session is open; generation follows."""

    prompt_tokens: int


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


GenerationEvent = Started | TextDelta | Finished
