"""Block selection and rebalancing on synthetic swarms."""

import pytest

from engine.swarm.block_selection import (
    GIB,
    autograd_reserve_bytes,
    choose_best_blocks,
    choose_num_blocks,
    should_rebalance,
)
from engine.swarm.records import ServerInfo, ServerState
from engine.swarm.snapshot import SwarmSnapshot


def swarm(num_blocks: int, **servers: tuple[int, int, float]) -> SwarmSnapshot:
    """A snapshot where each server (name=(start, end, throughput)) is ONLINE on [start, end)."""
    infos = {
        name: ServerInfo(ServerState.ONLINE, float(thr), start_block=start, end_block=end)
        for name, (start, end, thr) in servers.items()
    }
    return SwarmSnapshot.from_servers("m", num_blocks, infos)


def test_memory_fit():
    assert choose_num_blocks(10 * GIB, GIB, GIB // 2, total_blocks=80) == 6  # 10 / 1.5
    assert choose_num_blocks(10 * GIB, GIB, 0, total_blocks=4) == 4  # never more than the model has
    assert choose_num_blocks(10 * GIB, GIB, 0, total_blocks=80, margin_bytes=3 * GIB) == 7
    assert choose_num_blocks(GIB, 2 * GIB, 0, total_blocks=80) == 0
    assert choose_num_blocks(GIB, GIB, 0, total_blocks=80, margin_bytes=2 * GIB) == 0  # margin above free
    assert autograd_reserve_bytes(14336) == 2 * GIB and autograd_reserve_bytes(4096) < GIB


def test_memory_fit_rejects_nonsense():
    with pytest.raises(ValueError):
        choose_num_blocks(-1, GIB, 0, 4)
    with pytest.raises(ValueError):
        choose_num_blocks(GIB, 0, 0, 4)


def test_empty_swarm_starts_at_zero():
    assert choose_best_blocks(3, swarm(8)) == (0, 3)
    assert choose_best_blocks(8, swarm(8)) == (0, 8)


def test_hole_gets_filled():
    snapshot = swarm(10, a=(0, 4, 5.0), b=(6, 10, 5.0))
    assert choose_best_blocks(2, snapshot) == (4, 6)
    start, end = choose_best_blocks(4, snapshot)
    assert start <= 4 and end >= 6  # the span covers the whole hole


def test_weakest_region_is_chosen_with_deterministic_ties():
    assert choose_best_blocks(2, [3.0, 3.0, 1.0, 1.0, 2.0]) == (2, 4)
    assert choose_best_blocks(2, [1.0, 1.0, 5.0, 1.0, 1.0]) == (0, 2)  # tie: lowest start


def test_joining_servers_count_for_selection():
    infos = {"a": ServerInfo(ServerState.JOINING, 5.0, start_block=0, end_block=3)}
    assert choose_best_blocks(3, SwarmSnapshot.from_servers("m", 6, infos)) == (3, 6)


def test_choose_best_blocks_rejects_bad_sizes():
    with pytest.raises(ValueError):
        choose_best_blocks(0, swarm(4))
    with pytest.raises(ValueError):
        choose_best_blocks(5, swarm(4))


def test_no_rebalance_in_a_balanced_swarm():
    snapshot = swarm(8, a=(0, 4, 1.0), b=(4, 8, 1.0), c=(0, 4, 1.0), d=(4, 8, 1.0))
    assert not any(should_rebalance(peer, snapshot) for peer in "abcd")


def test_rebalance_when_crowded_next_to_a_weak_region():
    # a, b, c all serve blocks 0-4; d alone serves 4-8 slowly: moving one of the crowd doubles the bottleneck.
    snapshot = swarm(8, a=(0, 4, 1.0), b=(0, 4, 1.0), c=(0, 4, 1.0), d=(4, 8, 1.0))
    assert should_rebalance("a", snapshot)
    assert not should_rebalance("d", snapshot)  # leaving would open a hole


def test_never_move_if_it_opens_a_hole():
    snapshot = swarm(8, a=(0, 4, 1.0), b=(4, 8, 10.0), c=(4, 8, 10.0))
    assert not should_rebalance("a", snapshot)


def test_unknown_peer_and_forced_rebalance():
    snapshot = swarm(4, a=(0, 4, 1.0))
    assert not should_rebalance("nobody", snapshot)
    assert should_rebalance("a", snapshot, balance_quality=1.5)


def test_small_gain_does_not_trigger_a_move():
    # Moving b to blocks 2-4 would raise the bottleneck only from 0.95 to 1.0: not worth reloading weights.
    snapshot = swarm(4, a=(0, 2, 1.0), b=(0, 2, 0.1), c=(2, 4, 0.95))
    assert not should_rebalance("b", snapshot, balance_quality=0.75)
    assert should_rebalance("b", snapshot, balance_quality=0.99)
