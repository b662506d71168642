"""The app ⇄ engine contract, written once: states, limits, records and file/keyring names.

It imports only the standard library, so both sides use it: the engine's service and API schemas, the
desktop app (which must never import the engine) and the test fakes. To add a field to /api/status,
/api/stats or /api/hosting/plan, add it to the record in `contract/records.py` with a default and a `doc`;
the API schema (engine/api/schemas.py) and docs follow from there.
"""

from contract.addresses import peer_address_problem
from contract.limits import (
    CPU_MEMORY_SHARE,
    DEFAULT_CONTEXT_TOKENS,
    MAX_STOP_LENGTH,
    MAX_STOP_SEQUENCES,
    MAX_TOKENS_LIMIT,
    SEED_RANGE,
)
from contract.names import (
    KEYRING_HF_USER,
    KEYRING_SERVICE,
    KEYRING_TOKEN_USER,
    LIFETIME_STATS_FILE,
    STATE_FILE,
    TOKEN_FILE,
)
from contract.records import ContextFit, HostingPlan, ModelFacts, Move, Pause, Stats, Status, field_docs
from contract.states import (
    MOVE_WORDS,
    QUANT_WORDS,
    HostingState,
    LoadPhase,
    MoveReason,
    PauseMode,
    PauseSource,
    Quant,
    ServerState,
    Swarm,
    hosting_progress,
)

__all__ = [
    "CPU_MEMORY_SHARE",
    "DEFAULT_CONTEXT_TOKENS",
    "KEYRING_HF_USER",
    "KEYRING_SERVICE",
    "KEYRING_TOKEN_USER",
    "LIFETIME_STATS_FILE",
    "MAX_STOP_LENGTH",
    "MAX_STOP_SEQUENCES",
    "MAX_TOKENS_LIMIT",
    "MOVE_WORDS",
    "QUANT_WORDS",
    "SEED_RANGE",
    "STATE_FILE",
    "TOKEN_FILE",
    "ContextFit",
    "HostingPlan",
    "HostingState",
    "LoadPhase",
    "ModelFacts",
    "Move",
    "MoveReason",
    "Pause",
    "PauseMode",
    "PauseSource",
    "Quant",
    "ServerState",
    "Stats",
    "Status",
    "Swarm",
    "field_docs",
    "hosting_progress",
    "peer_address_problem",
]
