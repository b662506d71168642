"""A server drained mid-generation (grace over, session ended): our client replays elsewhere, same tokens."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.client.model import DistributedModelForCausalLM
from engine.client.sequence_manager import ClientConfig
from engine.server.drain import DrainMode
from engine.swarm.dht_node import start_dht
from tests.helpers.servers import running_server, wait_for

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", [DrainMode.HOLD, DrainMode.RELEASE])
def test_drain_mid_generation_gives_identical_output(tiny_checkpoint_factory, mode):
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint_factory("llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(5, local.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = local.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, do_sample=False
        )

    boot = start_dht(None, host="127.0.0.1", new_swarm=True)
    peers = [str(a) for a in boot.get_visible_maddrs()]
    client_dht = start_dht(peers, client_mode=True)
    prefix = f"drain-client-{mode.value}"
    span = dict(start_block=0, end_block=4, dht_prefix=prefix)
    try:
        with (
            running_server(path, peers, **span) as first,
            running_server(path, peers, **span) as second,
            DistributedModelForCausalLM.from_pretrained(
                str(path), dht=client_dht, dht_prefix=prefix, client_config=ClientConfig(request_timeout=30.0)
            ) as remote,
            remote.inference_session(max_length=32) as session,
        ):
            hosts = {first.info().peer_id: first, second.info().peer_id: second}
            tokens, reports, drains = [], [], []
            for step in remote.generate_stream(ids, max_new_tokens=14, session=session):
                tokens.append(step.tokens)
                if len(tokens) == 5:
                    (victim,) = [hop.peer_id for hop in session.route]
                    host = hosts.pop(victim)
                    # Grace 0: the drain ends the open session while the client waits between two steps.
                    drain = threading.Thread(target=lambda h=host: reports.append(h.drain(0.0, mode)))
                    drain.start()
                    drains.append(drain)
                    assert wait_for(lambda: reports, 30, 0.01)
                    drained_at = time.monotonic()
            recovery = time.monotonic() - drained_at
            for drain in drains:
                drain.join(30)
            (survivor,) = hosts
            assert [hop.peer_id for hop in session.route] == [survivor]
            assert reports and reports[0].sessions_at_start == 1
            print(f"drain {mode.value}: {reports[0]}; replay and the remaining tokens took {recovery:.1f} s")
    finally:
        replica = RemoteExpertWorker.run_coroutine(client_dht.replicate_p2p())
        RemoteExpertWorker.run_coroutine(replica.shutdown())
        client_dht.shutdown()
        boot.shutdown()
    assert torch.equal(torch.cat([ids, torch.stack(tokens, dim=1)], dim=1), expected)
