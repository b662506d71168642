"""Announcer behaviour against a fake DHT that records what would be stored (no network)."""

import threading

import pytest

from engine.swarm.announce import Announcer
from engine.swarm.keys import MODELS_INDEX_KEY, PROTOCOL_VERSION
from engine.swarm.records import ModelInfo, ServerInfo, ServerState


class FakePeerID:
    def to_base58(self) -> str:
        return "QmFake"


class FakeDHT:
    """Records block declarations and index stores; fails the first ``failures`` declarations."""

    num_workers = None
    peer_id = FakePeerID()

    def __init__(self, failures: int = 0):
        self.declared: list[tuple] = []
        self.stored: list[tuple] = []
        self.failures = failures
        self.lock = threading.Lock()

    def run_coroutine(self, coroutine):
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("DHT is busy")
            self.declared.append((coroutine.keywords["uids"], coroutine.keywords["value"]))
        return dict.fromkeys(coroutine.keywords["uids"], True)

    def store(self, key, value, expiration_time, subkey=None):
        self.stored.append((key, subkey, value))
        return True


def test_announcer_declares_span_then_offline():
    dht = FakeDHT()
    announcer = Announcer(
        dht, "m-hf", 2, 4, ServerInfo(ServerState.JOINING, 1.0), ModelInfo(8), update_period=60
    )
    announcer.stop()  # never started: nothing to say
    assert dht.declared == []
    announcer.start()
    uids, (state, _, extra) = dht.declared[0]
    assert uids == ["m-hf.2", "m-hf.3"] and state == ServerState.JOINING
    assert (extra["start_block"], extra["end_block"], extra["pollinate_protocol"]) == (2, 4, PROTOCOL_VERSION)
    assert dht.stored == [(MODELS_INDEX_KEY, "m-hf", {"num_blocks": 8, "repository": None})]
    announcer.update(state=ServerState.ONLINE, wait=True, timeout=5)
    assert dht.declared[-1][1][0] == ServerState.ONLINE
    announcer.stop()
    assert dht.declared[-1][1][0] == ServerState.OFFLINE and dht.declared[-1][1][2]["next_pings"] is None
    assert len(dht.stored) == 2  # the OFFLINE round does not refresh the model index


def test_fields_provider_and_failures_do_not_kill_the_thread():
    dht = FakeDHT(failures=1)
    fresh = iter(range(100, 0, -1))
    announcer = Announcer(
        dht,
        "m-hf",
        0,
        1,
        ServerInfo(ServerState.ONLINE, 1.0),
        update_period=0.05,
        fields_provider=lambda: {"cache_tokens_left": next(fresh)},
    )
    announcer.start(wait=False)
    announcer.update(wait=True, timeout=5)  # the first round failed; later rounds still happen
    announcer.stop()
    assert dht.declared and dht.declared[0][1][2]["cache_tokens_left"] < 100


def test_announcer_argument_checks():
    with pytest.raises(ValueError):
        Announcer(FakeDHT(), "m", 0, 1, ServerInfo(ServerState.ONLINE, 1.0), update_period=0)
    with pytest.raises(ValueError):
        Announcer(FakeDHT(), "m", 1, 1, ServerInfo(ServerState.ONLINE, 1.0))
    with pytest.raises(ValueError):
        Announcer(FakeDHT(), "a.b", 0, 1, ServerInfo(ServerState.ONLINE, 1.0))
