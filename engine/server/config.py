"""ServerConfig: everything a block server needs to know, parsed once at the entry point and then frozen."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

QUANT_CHOICES = ("auto", "none", "int8", "nf4")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
COMPRESSION_CHOICES = ("none", "float16", "meanstd_16bit", "blockwise_8bit")


class ConfigError(ValueError):
    """A ServerConfig field has a value the server cannot run with."""


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class ServerConfig:
    """How to run one block server; validated on construction, immutable afterwards.

    Block choice: give `start_block` and `end_block` (a fixed span), or `num_blocks` (the best place for that
    many blocks is chosen from the swarm), or neither (as many blocks as memory allows, placed automatically).
    """

    # Hub id ("meta-llama/Llama-2-7b-hf") or local checkpoint folder.
    model: str
    # First hosted block (inclusive); set together with end_block.
    start_block: int | None = None
    # Last hosted block (exclusive).
    end_block: int | None = None
    # How many blocks to host when the span is chosen automatically; None with no span means "as many as fit".
    num_blocks: int | None = None
    # DHT prefix of the model's blocks; None derives Petals' default from the model id.
    dht_prefix: str | None = None
    # Repository announced in the model index (Petals clients show it); None uses `model` when it is a hub id.
    repository: str | None = None
    # Multiaddrs of peers already in the swarm.
    initial_peers: tuple[str, ...] = ()
    # Start a swarm of our own instead of joining one (initial_peers must then be empty).
    new_swarm: bool = False
    # Address the p2p daemon listens on; 0.0.0.0 accepts peers from the network.
    host: str = "0.0.0.0"
    # TCP port of the p2p daemon; 0 picks a free one.
    port: int = 0
    # Weight quantization: auto (nf4 on CUDA, none elsewhere), none, int8 or nf4 (both CUDA only).
    quant: str = "auto"
    # Compute dtype: auto (the checkpoint's dtype on GPU, float32 on CPU), float32, float16 or bfloat16.
    dtype: str = "auto"
    # Where blocks run: auto (cuda, then mps, then cpu), cpu, cuda or mps.
    device: str = "auto"
    # KV-cache budget in bytes for all sessions together; None sizes it for `cache_tokens` tokens per block.
    cache_bytes: int | None = None
    # Tokens of KV cache per hosted block used to size the default budget (Petals' attn_cache_tokens).
    cache_tokens: int = 8192
    # Longest max_length one inference session may ask for.
    inference_max_length: int = 2048
    # Longest a session waits for cache room, whatever the client asks (Petals' max_alloc_timeout).
    max_alloc_timeout: float = 600.0
    # Wait for cache room when the client sends no alloc_timeout (Petals waits 0 s: the client reroutes).
    default_alloc_timeout: float = 0.0
    # Tokens (batch x length) one forward/backward request may carry; announced in rpc_info.
    max_request_tokens: int = 8192
    # Bytes of tensors one request may send; announced in rpc_info.
    max_request_bytes: int = 256 * 1024**2
    # Tokens of a forward run in one go; longer forwards run in chunks, other peers' steps in between.
    forward_chunk_tokens: int = 512
    # Limit for one forward/backward request, seconds.
    request_timeout: float = 180.0
    # Limit for a whole inference session, seconds.
    session_timeout: float = 1800.0
    # Longest wait for the next step of an inference session before it is closed, seconds.
    step_timeout: float = 300.0
    # Seconds between DHT announcements; records expire after twice this.
    update_period: float = 60.0
    # Announced throughput (requests/s); None measures it once per hardware+model and caches the result.
    throughput: float | None = None
    # Name shown to other peers (Petals' public_name), e.g. a website or a nickname.
    public_name: str | None = None
    # Wire compression of the outputs we send (Petals default: none).
    compression: str = "none"
    # Extra multiaddrs to announce (e.g. a public address behind NAT); empty announces what the daemon sees.
    announce_maddrs: tuple[str, ...] = field(default=())
    # After going ONLINE, ask other peers to dial us back and announce the verdict (swarm/reachability.py).
    check_reachability: bool = True
    # Look for a libp2p relay when nobody can dial us (hivemind's use_auto_relay); None: on unless we listen
    # on loopback only (a local swarm needs no relay).
    use_auto_relay: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError("model must be a hub id or a checkpoint folder, got an empty value")
        object.__setattr__(self, "initial_peers", tuple(self.initial_peers))
        object.__setattr__(self, "announce_maddrs", tuple(self.announce_maddrs))
        has_start, has_end = self.start_block is not None, self.end_block is not None
        if has_start != has_end:
            raise ConfigError(
                "start_block and end_block go together: give both (e.g. --blocks 0:8) or neither"
            )
        if has_start:
            if not (isinstance(self.start_block, int) and isinstance(self.end_block, int)):
                raise ConfigError("start_block and end_block must be ints")
            if not 0 <= self.start_block < self.end_block:
                raise ConfigError(
                    f"block span {self.start_block}:{self.end_block} is empty or negative; "
                    "it must satisfy 0 <= start < end"
                )
            if self.num_blocks is not None:
                raise ConfigError("give either a block span (start/end) or num_blocks, not both")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ConfigError(f"num_blocks must be a positive int, got {self.num_blocks!r}")
        if self.new_swarm and self.initial_peers:
            raise ConfigError("new_swarm starts a swarm of its own: leave initial_peers empty")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port!r}")
        _choice("quant", self.quant, QUANT_CHOICES)
        _choice("dtype", self.dtype, DTYPE_CHOICES)
        _choice("device", self.device, DEVICE_CHOICES)
        _choice("compression", self.compression, COMPRESSION_CHOICES)
        if self.cache_bytes is not None:
            _positive("cache_bytes", self.cache_bytes)
        _positive("cache_tokens", self.cache_tokens)
        _positive("inference_max_length", self.inference_max_length)
        for name in ("max_request_tokens", "max_request_bytes", "forward_chunk_tokens"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"{name} must be an int, got {getattr(self, name)!r}")
            _positive(name, getattr(self, name))
        _positive("max_alloc_timeout", self.max_alloc_timeout, allow_zero=True)
        _positive("default_alloc_timeout", self.default_alloc_timeout, allow_zero=True)
        for name in ("request_timeout", "session_timeout", "step_timeout", "update_period"):
            _positive(name, getattr(self, name))
        if self.throughput is not None:
            _positive("throughput", self.throughput)
        if self.public_name is not None and len(self.public_name) > 256:
            raise ConfigError("public_name is longer than 256 characters")

    @property
    def fixed_span(self) -> tuple[int, int] | None:
        """(start, end) when the span was given explicitly, else None (chosen at start)."""
        return (self.start_block, self.end_block) if self.start_block is not None else None

    def replace(self, **changes) -> ServerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
