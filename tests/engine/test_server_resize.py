"""Live resize: a serving host shrinks and grows its span through the drain path, on the same peer id."""

from __future__ import annotations

import pytest
import torch

from contract import MoveReason
from engine.server.config import ServerConfig
from engine.server.rebalancer import MoveHooks, Rebalancer
from engine.swarm.discovery import fetch_snapshot
from tests.helpers.servers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_resize_shrinks_and_grows_the_span_without_a_restart(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama", num_layers=8)
    config = ServerConfig(
        model=str(path), num_blocks=4, new_swarm=True, host="127.0.0.1", device="cpu", throughput=1.0,
        dht_prefix="resize-test", update_period=5.0, check_reachability=False,
    )  # fmt: skip
    rebalancer = Rebalancer(config, period=0, grace_seconds=1.0)
    try:
        first = rebalancer.start()
        peer_id = rebalancer.peer_id
        assert (first.info().start_block, first.info().end_block) == (0, 4)

        def announced():
            span = fetch_snapshot(rebalancer.dht, "resize-test", 8).spans_by_peer().get(peer_id)
            return None if span is None else (span.start, span.end)

        assert rebalancer.resize(2) == (0, 2)  # the user's memory share shrank
        assert rebalancer.host is not first and rebalancer.peer_id == peer_id
        assert rebalancer.host.info().start_block == 0 and rebalancer.host.info().end_block == 2
        assert first.info().state.value == "stopped"  # the old span's memory is freed
        assert wait_for(lambda: announced() == (0, 2), timeout=20), announced()

        assert rebalancer.resize(6) == (0, 6)  # and grew
        assert wait_for(lambda: announced() == (0, 6), timeout=20), announced()
        hidden = torch.randn(1, 3, rebalancer.host.info().hidden_size)
        assert rebalancer.host.run_local_forward(0, 6, hidden).shape == hidden.shape  # it serves
        assert rebalancer.moves == 2
        with pytest.raises(ValueError, match=r"1\.\.8"):
            rebalancer.resize(9)

        # Free memory changed (the owner's hook says so): a round resizes, and the owner hears why.
        heard = []

        class Hooks(MoveHooks):
            def wanted_blocks(self, current):
                return 3

            def move_starting(self, old, span, reason):
                heard.append((span, reason))
                return True

        rebalancer.hooks = Hooks()
        rebalancer.host.pause()  # a paused host is never moved
        assert not rebalancer.check_once() and heard == []
        rebalancer.host.resume()
        assert rebalancer.check_once()
        assert heard == [((0, 3), MoveReason.MEMORY)] and rebalancer.peer_id == peer_id
        assert wait_for(lambda: announced() == (0, 3), timeout=20), announced()
    finally:
        rebalancer.stop()
