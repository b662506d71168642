"""The rebalancer's pure parts: jittered waits and where a moving server goes."""

import random

from engine.server.rebalancer import best_span_without, jittered, memory_resize_target
from engine.swarm.block_selection import should_rebalance
from engine.swarm.records import ServerInfo, ServerState
from engine.swarm.snapshot import SwarmSnapshot


def swarm(num_blocks: int, **servers: tuple[int, int, float]) -> SwarmSnapshot:
    infos = {
        name: ServerInfo(ServerState.ONLINE, float(thr), start_block=start, end_block=end)
        for name, (start, end, thr) in servers.items()
    }
    return SwarmSnapshot.from_servers("m", num_blocks, infos)


def test_waits_are_jittered_around_the_period():
    rng = random.Random(1)
    waits = [jittered(10.0, rng) for _ in range(200)]
    assert all(5.0 <= wait <= 15.0 for wait in waits)
    assert max(waits) - min(waits) > 5.0  # spread: servers started together do not check together
    assert 9.0 < sum(waits) / len(waits) < 11.0


def test_a_server_leaves_and_one_of_the_doubled_ones_fills_the_gap():
    # Three servers of 4 blocks on 8 blocks: a and c double blocks 0:4, b held 4:8 and left.
    after = swarm(8, a=(0, 4, 1.0), c=(0, 4, 1.0))
    assert should_rebalance("a", after) and should_rebalance("c", after)
    assert best_span_without("a", after, 4) == (4, 8)
    # Once a moved (joining counts), c stays: leaving would open a hole.
    moved = swarm(8, a=(4, 8, 1.0), c=(0, 4, 1.0))
    assert not should_rebalance("c", moved) and not should_rebalance("a", moved)


def test_resize_plans_a_span_of_the_new_length_where_the_swarm_is_weakest():
    snapshot = swarm(8, a=(0, 4, 1.0), b=(2, 8, 2.0))
    assert best_span_without("a", snapshot, 2) == (0, 2)  # blocks 0:2 lose their only server otherwise
    assert best_span_without("a", snapshot, 6) == (0, 6)
    assert best_span_without("newcomer", snapshot, 2) == (0, 2)  # not in the swarm: nothing to take out


def test_free_memory_resizes_only_when_two_checks_in_a_row_agree():
    assert memory_resize_target(4, 4, 2) is None  # still fits what it serves
    assert memory_resize_target(4, 2, None) is None  # first sight of less memory: maybe a passing spike
    assert memory_resize_target(4, 2, 3) is None  # the checks disagree
    assert memory_resize_target(4, 2, 2) == 2  # shrink
    assert memory_resize_target(4, 6, 6) == 6  # grow
    assert memory_resize_target(4, None, 2) is None  # could not tell
