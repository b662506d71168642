"""The records the engine reports (/api/status, /api/stats, /api/hosting/plan, /v1/models facts).

Frozen dataclasses; `to_dict()` is the JSON the API sends, `from_dict()` reads it back leniently (unknown
keys ignored, missing ones take their defaults), so an app and an engine of neighbouring versions still
understand each other. Every field has a default and a `doc` (the API schema's description).
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass, field
from typing import Any, Self

from contract.limits import DEFAULT_CONTEXT_TOKENS
from contract.states import HostingState, LoadPhase, MoveReason, PauseMode, PauseSource, Swarm


def _doc(text: str, default: Any = None, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: enums as their values, tuples as lists."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Self:
        """Read a record from JSON; unknown keys are ignored, missing keys take their defaults."""
        data = data or {}
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                values[f.name] = _coerce(hints[f.name], data[f.name])
        return cls(**values)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _coerce(hint: Any, value: Any) -> Any:
    """Enums from their values (an unknown value stays a plain string: a newer peer may add states)."""
    if value is None:
        return None
    for kind in typing.get_args(hint) or (hint,):
        if isinstance(kind, type) and issubclass(kind, _Record) and isinstance(value, dict):
            return kind.from_dict(value)
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            try:
                return kind(value)
            except ValueError:
                return value
    return value


def field_docs(record: type) -> dict[str, str]:
    """Field name -> description, for the API schema."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(record)}


@dataclass(frozen=True)
class Pause(_Record):
    """Why sharing is paused and until when (Status.pause)."""

    reason: str = _doc('a code: "user", "fullscreen", "exclusive_app", "gpu_busy", "cpu_busy", ...', "user")
    message: str = _doc("the reason, for a person", "")
    since: float = _doc("when the pause began (epoch seconds)", 0.0)
    until: float | None = _doc("when it ends by itself (epoch seconds); null: when its cause clears")
    mode: PauseMode = _doc("hold: weights kept loaded; release: weights and caches freed", PauseMode.RELEASE)
    source: PauseSource = _doc("user or policy", PauseSource.USER)


@dataclass(frozen=True)
class Move(_Record):
    """The hosted span moving to other blocks while sharing (Status.move): drain, then load the new span."""

    reason: MoveReason = _doc('"rebalance", "share" (memory share changed) or "memory" (free memory)',
                              MoveReason.REBALANCE)  # fmt: skip
    message: str = _doc('for a person, e.g. "Moving to blocks 4:8 (the swarm needs them more)"', "")
    from_blocks: list[int] | None = _doc("[start, end) served before the move")
    to_blocks: list[int] | None = _doc("[start, end) being loaded")
    since: float = _doc("when the move began (epoch seconds)", 0.0)


@dataclass(frozen=True)
class Status(_Record):
    """Where the hosting state machine is (/api/status and `status` events)."""

    state: HostingState = _doc("idle, loading, serving, draining, paused or error", HostingState.IDLE)
    progress: float | None = _doc(
        "0..1 while loading, or before ready while the engine prepares the demo model; else null"
    )
    phase: LoadPhase | None = _doc("the step of a hosting start while loading, else null")
    message: str | None = _doc("what is happening or what went wrong, for a person")
    model: str | None = _doc("the hosted model")
    blocks: list[int] | None = _doc("[start, end) of the hosted span")
    swarm: Swarm = _doc("the swarm the engine joined", Swarm.LOCAL)
    ready: bool = _doc("the engine has joined the swarm (and started the demo servers if local)", False)
    addresses: list[str] = _doc(
        "multiaddresses other engines can join this swarm through (local swarm: this machine only)",
        factory=list,
    )
    invite: str | None = _doc(
        "a token carrying those addresses, for 'Join with an invite' (contract.invites)"
    )
    reachability: dict[str, Any] | None = _doc(
        "the hosted server's dial-back check, or null while not hosting or not checked yet: "
        '{"state": "reachable"/"relayed"/"unreachable"/"unknown", "advice": the one thing to do or null, '
        '"port", "helpers_asked", "helpers_answered", "dialled_back", "checked_at"}'
    )
    pause: Pause | None = _doc("why sharing is paused and until when: set while paused or draining to pause")
    move: Move | None = _doc(
        "set while the hosted span moves to other blocks (state draining, then loading); null otherwise"
    )


@dataclass(frozen=True)
class Stats(_Record):
    """Counters (/api/stats and `stats` events). `lifetime_*` survive engine restarts and never decrease."""

    tokens_served: int = _doc("tokens this engine's servers processed for others since it started", 0)
    requests_served: int = _doc("requests this engine's servers answered since it started", 0)
    uptime_seconds: float = _doc("seconds since the engine started", 0.0)
    hosting_seconds: float = _doc("seconds spent serving since the engine started", 0.0)
    sessions_active: int = _doc("inference sessions open on this engine's servers", 0)
    points: float = _doc("points earned by serving (the ledger)", 0.0)
    priority: float = _doc("how soon servers serve this engine (1.0 = newcomer)", 1.0)
    tokens_generated: int = _doc("tokens this engine generated for its own API clients", 0)
    requests_generated: int = _doc("completions this engine ran for its own API clients", 0)
    lifetime_tokens_served: int = _doc("tokens served over every run of the engine", 0)
    lifetime_requests_served: int = _doc("requests served over every run of the engine", 0)
    lifetime_hosting_seconds: float = _doc("seconds spent serving over every run of the engine", 0.0)
    moves: int = _doc("times the hosted span moved or was resized since the engine started", 0)


@dataclass(frozen=True)
class HostingPlan(_Record):
    """What hosting a model would take (/api/hosting/plan), for the chosen quantization and memory share."""

    model: str = _doc("the model", "")
    dht_prefix: str = _doc("the prefix of its blocks' DHT keys", "")
    start_block: int = _doc("first block of the span", 0)
    end_block: int = _doc("end of the span (exclusive)", 0)
    num_blocks: int = _doc("blocks in the span", 0)
    total_blocks: int = _doc("blocks of the whole model", 0)
    quant: str = _doc("resolved quantization: none, int8 or nf4", "none")
    dtype: str = _doc("the blocks' compute dtype", "float32")
    device: str = _doc("cuda, mps or cpu", "cpu")
    memory_kind: str = _doc('"gpu" (GPU memory) or "ram" (main memory): where the blocks live', "ram")
    budget_bytes: int = _doc("the memory share hosting may use", 0)
    weights_bytes: int = _doc("memory of the span's weights", 0)
    cache_bytes: int = _doc("memory of its attention cache", 0)
    total_bytes: int = _doc("weights + cache", 0)


@dataclass(frozen=True)
class ContextFit(_Record):
    """How a chat request was fitted into the model's context (`pollinate` of a chat completion)."""

    prompt_tokens: int = _doc("tokens of the prompt as sent to the model", 0)
    context_length: int = _doc("the longest prompt + reply the engine runs for this model", 0)
    max_tokens: int = _doc("new tokens the reply may use", 0)
    dropped_messages: int = _doc("oldest turns left out to fit (only with `pollinate.fit_context`)", 0)


@dataclass(frozen=True)
class ModelFacts(_Record):
    """Pollinate's facts about a model in /v1/models (`pollinate` of each entry)."""

    label: str = _doc("a name for people", "")
    demo: bool = _doc("hosted by the local swarm's demo servers", False)
    random_weights: bool = _doc("a tiny random model: its replies are gibberish (say so)", False)
    num_blocks: int = _doc("transformer blocks of the model", 0)
    missing_blocks: list[int] = _doc("blocks no server holds now", factory=list)
    context_length: int = _doc(
        "longest prompt + reply in tokens the engine runs for this model", DEFAULT_CONTEXT_TOKENS
    )
