"""States as their own types: quantization, swarm, hosting state and the typed phases of a hosting start."""

from __future__ import annotations

from enum import StrEnum


class Quant(StrEnum):
    """How hosted blocks are stored; AUTO lets the engine choose (nf4 on CUDA, none elsewhere)."""

    AUTO = "auto"
    NONE = "none"
    INT8 = "int8"
    NF4 = "nf4"


# What a person reads for each resolved quantization.
QUANT_WORDS = {Quant.NONE: "full precision", Quant.INT8: "int8", Quant.NF4: "nf4 (4-bit)"}


class Swarm(StrEnum):
    """Which swarm the engine joins."""

    LOCAL = "local"  # a new swarm on 127.0.0.1 with a demo server
    PUBLIC = "public"  # the public Petals swarm
    PRIVATE = "private"  # the user's own, reached through initial peers


class HostingState(StrEnum):
    """The hosting state machine: idle -> loading -> serving -> draining -> idle, or error; and
    serving -> draining -> paused -> serving (weights held) or loading (weights freed)."""

    IDLE = "idle"
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    PAUSED = "paused"  # stepped aside for the machine's owner (Status.pause says why and until when)
    ERROR = "error"


class PauseMode(StrEnum):
    """What a pause keeps: HOLD keeps the weights loaded (resume in about a second), RELEASE frees them."""

    HOLD = "hold"
    RELEASE = "release"


class PauseSource(StrEnum):
    """Who paused: the user (ends at its end time or by the user) or a politeness policy (ends by itself)."""

    USER = "user"
    POLICY = "policy"


class MoveReason(StrEnum):
    """Why the hosted span moves while sharing (Status.move)."""

    REBALANCE = "rebalance"  # the swarm needs other blocks more (Petals' rule)
    SHARE = "share"  # the user changed the memory share
    MEMORY = "memory"  # free memory on the device changed


# What a person reads for each move reason.
MOVE_WORDS = {
    MoveReason.REBALANCE: "the swarm needs them more",
    MoveReason.SHARE: "you changed the memory share",
    MoveReason.MEMORY: "free memory changed",
}


class ServerState(StrEnum):
    """A server's state as the swarm announces it (Petals: OFFLINE=0, JOINING=1, ONLINE=2)."""

    OFFLINE = "offline"
    JOINING = "joining"
    ONLINE = "online"


class LoadPhase(StrEnum):
    """The steps of a hosting start, in order; each covers a share of the overall progress."""

    PREPARING = "preparing"  # planning the span (the service)
    RESOLVING = "resolving"  # finding the checkpoint (may download)
    JOINING = "joining"  # joining the swarm, announcing JOINING
    LOADING_BLOCKS = "loading_blocks"  # reading and quantizing the span's blocks
    MEASURING = "measuring"  # measuring throughput
    STARTING = "starting"  # registering the RPC handlers, announcing ONLINE

    @property
    def words(self) -> str:
        """What a person reads while this phase runs."""
        return _PHASE_WORDS[self]


_PHASE_WORDS = {
    LoadPhase.PREPARING: "Preparing",
    LoadPhase.RESOLVING: "Finding the model's files",
    LoadPhase.JOINING: "Joining the swarm",
    LoadPhase.LOADING_BLOCKS: "Loading blocks",
    LoadPhase.MEASURING: "Measuring speed",
    LoadPhase.STARTING: "Starting to serve",
}
# Where each phase starts in the overall progress (0..1); a phase's own fraction fills its share.
_PHASE_START = {
    LoadPhase.PREPARING: 0.0,
    LoadPhase.RESOLVING: 0.02,
    LoadPhase.JOINING: 0.05,
    LoadPhase.LOADING_BLOCKS: 0.1,
    LoadPhase.MEASURING: 0.85,
    LoadPhase.STARTING: 0.95,
}


def hosting_progress(phase: LoadPhase, fraction: float = 0.0) -> float:
    """Overall progress (0..1) of a hosting start that is `fraction` (0..1) through `phase`."""
    phases = list(LoadPhase)
    start = _PHASE_START[phase]
    index = phases.index(phase)
    end = _PHASE_START[phases[index + 1]] if index + 1 < len(phases) else 1.0
    return round(start + (end - start) * min(1.0, max(0.0, fraction)), 4)
