"""The engine service behind `pollinate-engine run`: EngineService, its configuration, events and errors."""

from engine.service.config import ModelRef, ServiceConfig
from engine.service.engine import EngineService
from engine.service.errors import (
    EngineNotReadyError,
    InvalidRequestError,
    ModelNotFoundError,
    ServiceError,
    SwarmUnavailableError,
    WrongStateError,
)
from engine.service.text import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    IncrementalDecoder,
    Started,
    TextDelta,
    TextHoldback,
)

__all__ = [
    "EngineNotReadyError",
    "EngineService",
    "Finished",
    "GenerationEvent",
    "GenerationRequest",
    "IncrementalDecoder",
    "InvalidRequestError",
    "ModelNotFoundError",
    "ModelRef",
    "ServiceConfig",
    "ServiceError",
    "Started",
    "SwarmUnavailableError",
    "TextDelta",
    "TextHoldback",
    "WrongStateError",
]
