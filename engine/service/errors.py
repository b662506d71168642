"""Errors of the engine service: "this request failed" (the engine lives on); engine.api maps `type`."""

from __future__ import annotations

from typing import Any


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


class EngineNotReadyError(ServiceError):
    """The engine is still joining the swarm (status `ready` is false); a status event follows when it is."""

    type = "engine_not_ready"


class SwarmUnavailableError(ServiceError):
    """The swarm cannot serve the model now: some blocks have no server."""

    type = "swarm_unavailable"

    def __init__(self, message: str, missing_blocks: tuple[int, ...] | list[int] = ()):
        super().__init__(message)
        self.missing_blocks = [int(b) for b in missing_blocks]

    def extra(self) -> dict[str, Any]:
        return {"missing_blocks": self.missing_blocks} if self.missing_blocks else {}


class SwarmTimeoutError(ServiceError):
    """The swarm (its DHT) did not answer in time; the engine keeps reading it in the background."""

    type = "swarm_timeout"


def unavailable(model: str, missing) -> SwarmUnavailableError:
    """The error for a model whose blocks `missing` have no server."""
    shown = ", ".join(str(b) for b in missing)
    return SwarmUnavailableError(
        f"The swarm cannot serve {model}: block{'s' if len(missing) > 1 else ''} {shown} "
        f"{'have' if len(missing) > 1 else 'has'} no server. "
        "Wait for servers to join, or host them yourself.",
        list(missing),
    )
