"""DHT records in the Petals 2.x wire format, with strict validation of what peers send us.

A server announces each block it hosts under key ``"{dht_prefix}.{i}"``, subkey = its peer id (base58),
value = ``(state, throughput, extra)`` where ``extra`` is a dict of the optional ServerInfo fields.
Petals ignores extra keys it does not know, so Pollinate's extensions (``pollinate_protocol``, ``points``)
travel there too.
Petals validates with pydantic in strict mode: floats must be floats and ints must be ints on the wire, which
is why ``to_tuple`` converts every number to its exact type.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from enum import IntEnum
from typing import Any

MAX_TEXT_LENGTH = 1024  # public_name, version, dtype names, repository urls: far above any honest value
MAX_ADAPTERS = 256
MAX_PINGS = 1024


class InvalidRecordError(ValueError):
    """A DHT value that does not follow the record schema (malformed, wrong types or out of range)."""


class ServerState(IntEnum):
    """A server's announced state; Petals clients route only through ONLINE servers."""

    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


# Optional fields Petals 2.2+ puts in the extra dict, in its order (start_block/end_block since 2.3.0.dev).
PETALS_EXTRA_FIELDS = (
    "start_block",
    "end_block",
    "public_name",
    "version",
    "network_rps",
    "forward_rps",
    "inference_rps",
    "adapters",
    "torch_dtype",
    "quant_type",
    "using_relay",
    "cache_tokens_left",
    "next_pings",
)
# Pollinate's extensions, written only when set so Petals records stay byte-for-byte the same shape.
POLLINATE_EXTRA_FIELDS = ("pollinate_protocol", "points", "reachability")
REACHABILITY_STATES = ("reachable", "relayed", "unreachable", "unknown")


def _number(name: str, value: Any, *, allow_inf: bool = False) -> float:
    # bool is an int subclass; a True throughput is a bug or an attack, never a measurement.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRecordError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise InvalidRecordError(f"{name} must be finite, got {value}")
    if value < 0:
        raise InvalidRecordError(f"{name} must be >= 0, got {value}")
    return value


def _optional_number(name: str, value: Any) -> float | None:
    return None if value is None else _number(name, value)


def _optional_count(name: str, value: Any, *, minimum: int = 0) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRecordError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise InvalidRecordError(f"{name} must be >= {minimum}, got {value}")
    return value


def _optional_text(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRecordError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_LENGTH:
        raise InvalidRecordError(f"{name} is longer than {MAX_TEXT_LENGTH} characters")
    return value


def _optional_choice(name: str, value: Any, choices: tuple[str, ...]) -> str | None:
    if value is not None and value not in choices:
        raise InvalidRecordError(f"{name} must be one of {', '.join(choices)}, got {value!r:.80}")
    return value


def _optional_flag(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise InvalidRecordError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _adapters(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidRecordError(f"adapters must be a list of strings, got {type(value).__name__}")
    if len(value) > MAX_ADAPTERS:
        raise InvalidRecordError(f"more than {MAX_ADAPTERS} adapters")
    for item in value:
        if not isinstance(item, str) or len(item) > MAX_TEXT_LENGTH:
            raise InvalidRecordError(f"adapter names must be strings, got {item!r:.80}")
    return tuple(value)


def _pings(value: Any) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidRecordError(f"next_pings must be a dict, got {type(value).__name__}")
    if len(value) > MAX_PINGS:
        raise InvalidRecordError(f"next_pings has more than {MAX_PINGS} entries")
    pings = {}
    for peer_id, rtt in value.items():
        if not isinstance(peer_id, str) or len(peer_id) > MAX_TEXT_LENGTH:
            raise InvalidRecordError("next_pings keys must be peer id strings")
        # Petals reports an unreachable next server as an infinite round-trip time.
        pings[peer_id] = _number("next_pings value", rtt, allow_inf=True)
    return pings


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """What a server announces about itself for each block it hosts (Petals' ServerInfo, plus extensions).

    Construction validates every field and raises InvalidRecordError, so an invalid record cannot exist.
    ``next_pings`` is a plain dict (so records pickle); treat it as read-only.
    """

    state: ServerState
    throughput: float

    start_block: int | None = None
    end_block: int | None = None

    public_name: str | None = None
    version: str | None = None

    network_rps: float | None = None
    forward_rps: float | None = None
    inference_rps: float | None = None

    adapters: tuple[str, ...] = ()
    torch_dtype: str | None = None
    quant_type: str | None = None
    using_relay: bool | None = None
    cache_tokens_left: int | None = None
    next_pings: dict[str, float] | None = dataclasses.field(default=None, hash=False)

    pollinate_protocol: int | None = None
    points: float | None = None
    reachability: str | None = None  # the server's own dial-back check (engine.swarm.reachability)

    def __post_init__(self) -> None:
        state = self.state
        if (
            isinstance(state, bool)
            or not isinstance(state, int)
            or state not in ServerState._value2member_map_
        ):
            raise InvalidRecordError(f"state must be one of {[s.value for s in ServerState]}, got {state!r}")
        checked = {
            "state": ServerState(state),
            "throughput": _number("throughput", self.throughput),
            "start_block": _optional_count("start_block", self.start_block),
            "end_block": _optional_count("end_block", self.end_block),
            "public_name": _optional_text("public_name", self.public_name),
            "version": _optional_text("version", self.version),
            "network_rps": _optional_number("network_rps", self.network_rps),
            "forward_rps": _optional_number("forward_rps", self.forward_rps),
            "inference_rps": _optional_number("inference_rps", self.inference_rps),
            "adapters": _adapters(self.adapters),
            "torch_dtype": _optional_text("torch_dtype", self.torch_dtype),
            "quant_type": _optional_text("quant_type", self.quant_type),
            "using_relay": _optional_flag("using_relay", self.using_relay),
            "cache_tokens_left": _optional_count("cache_tokens_left", self.cache_tokens_left),
            "next_pings": _pings(self.next_pings),
            "pollinate_protocol": _optional_count("pollinate_protocol", self.pollinate_protocol),
            "points": _optional_number("points", self.points),
            "reachability": _optional_choice("reachability", self.reachability, REACHABILITY_STATES),
        }
        start, end = checked["start_block"], checked["end_block"]
        if start is not None and end is not None and end <= start:
            raise InvalidRecordError(f"end_block ({end}) must be greater than start_block ({start})")
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # normalized types: IntEnum, float, tuple

    def replace(self, **changes: Any) -> ServerInfo:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_tuple(self) -> tuple[int, float, dict[str, Any]]:
        """The DHT value Petals expects: ``(state, throughput, extra)``."""
        extra: dict[str, Any] = {}
        for name in PETALS_EXTRA_FIELDS:
            value = getattr(self, name)
            extra[name] = dict(value) if name == "next_pings" and value is not None else value
        for name in POLLINATE_EXTRA_FIELDS:
            if getattr(self, name) is not None:
                extra[name] = getattr(self, name)
        return (int(self.state), float(self.throughput), extra)

    @classmethod
    def from_tuple(cls, raw: Any) -> ServerInfo:
        """Parse a DHT value sent by any peer; raise InvalidRecordError if it is malformed.

        Like Petals, a missing extra dict means "no optional fields", elements after the third are ignored,
        and unknown extra keys are ignored (so fields added by future Petals versions don't break us).
        """
        if not isinstance(raw, tuple | list):
            raise InvalidRecordError(f"server record must be a tuple, got {type(raw).__name__}")
        if len(raw) < 2:
            raise InvalidRecordError(
                f"server record needs at least (state, throughput), got {len(raw)} items"
            )
        extra = raw[2] if len(raw) > 2 else {}
        if not isinstance(extra, Mapping):
            raise InvalidRecordError(f"server record extra must be a dict, got {type(extra).__name__}")
        known = PETALS_EXTRA_FIELDS + POLLINATE_EXTRA_FIELDS
        fields = {key: value for key, value in extra.items() if isinstance(key, str) and key in known}
        if fields.get("reachability") not in REACHABILITY_STATES:  # a state of a later version: not said
            fields.pop("reachability", None)
        try:
            return cls(state=raw[0], throughput=raw[1], **fields)
        except InvalidRecordError:
            raise
        except (TypeError, ValueError) as e:  # e.g. an unhashable value where a number belongs
            raise InvalidRecordError(str(e)) from e


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A model's entry in the ``_petals.models`` index: ``{"num_blocks": int, "repository": str | None}``."""

    num_blocks: int
    repository: str | None = None

    def __post_init__(self) -> None:
        if self.num_blocks is None:
            raise InvalidRecordError("num_blocks is required")
        _optional_count("num_blocks", self.num_blocks, minimum=1)
        _optional_text("repository", self.repository)

    def to_dict(self) -> dict[str, Any]:
        """The DHT value Petals stores under key ``_petals.models``, subkey = dht_prefix."""
        return {"num_blocks": self.num_blocks, "repository": self.repository}

    @classmethod
    def from_dict(cls, raw: Any) -> ModelInfo:
        """Parse an index entry; unknown keys are ignored, anything malformed raises InvalidRecordError."""
        if not isinstance(raw, Mapping):
            raise InvalidRecordError(f"model record must be a dict, got {type(raw).__name__}")
        return cls(num_blocks=raw.get("num_blocks"), repository=raw.get("repository"))


@dataclasses.dataclass(frozen=True)
class RemoteSpanInfo:
    """A run of consecutive blocks ``[start, end)`` served by one peer (peer id as a base58 string)."""

    peer_id: str
    start: int
    end: int
    server_info: ServerInfo

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def state(self) -> ServerState:
        return self.server_info.state

    @property
    def throughput(self) -> float:
        return self.server_info.throughput
