"""Earned priority under contention, with real peers on 127.0.0.1.

Server S (one compute loop, wired to its ledger) gets queued work from two peers at once: a contributor C,
whose own server did work for S's client, and a free-rider F that never served anyone. C's steps go first;
F waits, but within a bound, even while C floods the queue. The wait times are printed (run with -s).
"""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest
import torch

from engine.ledger import Ledger, LedgerPolicy
from engine.swarm.discovery import get_block_infos
from tests.helpers.ledger_servers import PeerCaller, ledger_server
from tests.helpers.servers import running_server, wait_for

pytestmark = pytest.mark.slow

BASE_DELAY = 1.0
REQUESTS = 10
FLOOD_ALLOWANCE = 5.0  # seconds beyond the base delay; see the assertion


def _burst(contributor: PeerCaller, free_rider: PeerCaller, server: str, uid: str, hidden: torch.Tensor):
    """Both peers queue REQUESTS forwards at once (the free-rider a little earlier); their latencies."""

    async def many(caller: PeerCaller) -> list[float]:
        return list(
            await asyncio.gather(*(caller.timed_forward(server, uid, hidden) for _ in range(REQUESTS)))
        )

    free_rider_waits = free_rider.start(many(free_rider))
    time.sleep(0.02)
    contributor_waits = contributor.start(many(contributor))
    return contributor_waits.result(120), free_rider_waits.result(120)


def _flood(contributor: PeerCaller, free_rider: PeerCaller, server: str, uid: str, hidden: torch.Tensor):
    """The contributor keeps 8 requests in flight; meanwhile the free-rider sends 3, one after another."""

    async def flood(stop: asyncio.Event) -> int:
        done = 0

        async def worker() -> None:
            nonlocal done
            while not stop.is_set():
                await contributor.forward(server, uid, hidden)
                done += 1

        await asyncio.gather(*(worker() for _ in range(8)))
        return done

    stop = asyncio.Event()
    flooding = contributor.start(flood(stop))
    time.sleep(0.3)
    waits = [free_rider.run(free_rider.timed_forward(server, uid, hidden), 120) for _ in range(3)]
    contributor.run(_set(stop))
    return waits, flooding.result(120)


async def _set(event: asyncio.Event) -> None:
    event.set()


def _summary(name: str, waits: list[float]) -> str:
    return (
        f"{name}: mean {statistics.mean(waits):.3f} s, median {statistics.median(waits):.3f} s, "
        f"max {max(waits):.3f} s"
    )


def test_contributor_goes_first_and_free_rider_waits_a_bounded_time(bootstrap_peer, tiny_checkpoint_factory):
    _, initial_peers = bootstrap_peer
    checkpoint = tiny_checkpoint_factory("llama", num_layers=2)
    ledger = Ledger(LedgerPolicy(base_delay=BASE_DELAY, credit_scale=0.01))
    torch.manual_seed(0)
    hidden = torch.randn(16, 128, 64)
    with (
        ledger_server(
            checkpoint, initial_peers, ledger, start_block=0, end_block=2, update_period=2.0
        ) as server,
        running_server(checkpoint, initial_peers, start_block=0, end_block=2) as contributor_server,
        PeerCaller(dht=server.dht) as server_client,
        PeerCaller(dht=contributor_server.dht) as contributor,
        PeerCaller() as free_rider,
    ):
        info, contributor_info = server.info(), contributor_server.info()
        uid = f"{info.dht_prefix}.0 {info.dht_prefix}.1"
        # The contributor's node speaks with the same peer id as its server (one p2p daemon).
        assert contributor.peer_id == contributor_info.peer_id
        for caller in (contributor, free_rider):
            caller.connect(info.multiaddrs)

        _burst(contributor, free_rider, info.peer_id, uid, hidden)  # warm-up: connections, allocations

        # Baseline: both are newcomers, so the queue is first come, first served.
        baseline_c, baseline_f = _burst(contributor, free_rider, info.peer_id, uid, hidden)

        # S's client uses C's server (real work on C), and records it through the client hook.
        server_client.connect(contributor_info.multiaddrs)
        started = time.perf_counter()
        server_client.run(server_client.forward(contributor_info.peer_id, uid, hidden[:1, :32]))
        ledger.record_consumed(contributor_info.peer_id, 32, 2, time.perf_counter() - started)
        assert ledger.priority_of(contributor_info.peer_id) > ledger.priority_of(free_rider.peer_id) == 1.0

        contributor_waits, free_rider_waits = _burst(contributor, free_rider, info.peer_id, uid, hidden)
        flood_waits, flood_done = _flood(contributor, free_rider, info.peer_id, uid, hidden)

        print()
        print(_summary("baseline (both newcomers) contributor", baseline_c))
        print(_summary("baseline (both newcomers) free-rider ", baseline_f))
        print(_summary("with earned priority:     contributor", contributor_waits))
        print(_summary("with earned priority:     free-rider ", free_rider_waits))
        print(f"free-rider under a contributor flood ({flood_done} contributor requests): "
              f"{[round(w, 3) for w in flood_waits]} s, base delay {BASE_DELAY} s")  # fmt: skip

        assert statistics.mean(contributor_waits) < statistics.mean(free_rider_waits)
        assert statistics.median(contributor_waits) < statistics.median(free_rider_waits)
        # Never starved. A starved free-rider would wait for the flood to end, and the flood here only ends
        # after the free-rider's requests return: it would run into the 120 s timeout. The aging bound is its
        # delay plus the work queued ahead of it; the allowance on top also covers moving 512 KB each way
        # through an event loop that the flood keeps busy, which takes seconds on a loaded 2-core machine
        # (quiet runs here: 0.5-2.8 s in all).
        assert max(flood_waits) < BASE_DELAY + FLOOD_ALLOWANCE
        assert flood_done > 8  # the flood did keep the queue busy meanwhile

        # The server counted what it served, per peer, and publishes its points in its DHT record.
        seen = {view.peer_id: view for view in ledger.contributions()}
        assert seen[free_rider.peer_id].served_token_blocks == (3 * REQUESTS + 3) * 16 * 128 * 2
        assert seen[contributor_info.peer_id].consumed_token_blocks == 32 * 2
        assert ledger.points() > 0

        def published_points():
            record = get_block_infos(server.dht, info.dht_prefix, 2)[0].get(info.peer_id)
            return record is not None and (record.points or 0) > 0

        assert wait_for(published_points, timeout=15)
