"""Rebalancing with real server processes: servers with --num-blocks 4 on an 8-block model cover it, and
when one leaves, another moves into the gap while a chat running through the swarm keeps its tokens."""

from __future__ import annotations

import time

import pytest
import torch

from engine.client.model import DistributedModelForCausalLM
from engine.swarm.dht_node import start_dht
from engine.swarm.discovery import fetch_snapshot
from tests.helpers.servers import running_server_process, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

SERVE = ("--num-blocks", "4", "--rebalance-period", "3", "--update-period", "5", "--move-grace", "3")
GAP_FILLED_WITHIN = 60.0  # seconds from a server's leaving until every block has a server again
NEW_TOKENS = 24


def test_servers_spread_and_fill_the_gap_of_one_that_leaves(tiny_checkpoint_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint_factory("llama", num_layers=8)
    prefix = "rebalance-test"
    args = (*SERVE, "--dht-prefix", prefix)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.tensor([[1, 300, 12, 450, 88, 7]])
    with torch.no_grad():
        expected = local.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0, prompt.shape[1] :]

    with running_server_process(path, (), *args) as first:
        peers = first.multiaddrs
        watcher = start_dht(peers, client_mode=True)

        def coverage():
            return fetch_snapshot(watcher, prefix, 8).coverage()

        try:
            with running_server_process(path, peers, *args) as second:
                assert wait_for(lambda: min(coverage()) >= 1, timeout=30), coverage()  # 0:4 and 4:8
                model = DistributedModelForCausalLM.from_pretrained(
                    str(path), initial_peers=peers, dht_prefix=prefix
                )
                with model:
                    tokens, joining, third, left_at = [], None, None, None
                    try:
                        for step in model.generate_stream(prompt, max_new_tokens=NEW_TOKENS):
                            tokens.append(int(step.tokens[0]))
                            if len(tokens) == 3:  # a third server joins mid-chat
                                joining = running_server_process(path, peers, *args)
                                third = joining.__enter__()
                            if len(tokens) == 8:  # the server of blocks 4:8 leaves mid-chat
                                second.process.terminate()
                                second.process.wait(30)
                                left_at = time.monotonic()
                        assert tokens == expected.tolist()
                        filled = wait_for(lambda: min(coverage()) >= 1, timeout=GAP_FILLED_WITHIN)
                        assert filled, f"the gap was not filled within {GAP_FILLED_WITHIN} s: {coverage()}"
                        print(f"gap filled {time.monotonic() - left_at:.1f} s after the server left")
                        moved = [
                            line for s in (first, third) for line in s.output if "moving from blocks" in line
                        ]
                        assert moved, "no server moved"
                        # The swarm settles: still covered a few check periods later, with chats through it.
                        time.sleep(10)
                        assert min(coverage()) >= 1, coverage()
                        again = model.generate(prompt, max_new_tokens=6)[0, prompt.shape[1] :]
                        assert again.tolist() == expected[:6].tolist()
                    finally:
                        if joining is not None:
                            joining.__exit__(None, None, None)
        finally:
            watcher.shutdown()
