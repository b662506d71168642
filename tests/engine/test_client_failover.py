"""kill -9 of a server mid-generation: the client replays to another server, and the output is unchanged."""

from __future__ import annotations

import time

import pytest
import torch

from engine.client.model import DistributedModelForCausalLM
from engine.client.sequence_manager import ClientConfig
from engine.swarm.dht_node import start_dht
from tests.helpers.servers import running_server_process

pytestmark = pytest.mark.slow


@pytest.fixture
def swarm():
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    boot = start_dht(None, host="127.0.0.1", new_swarm=True)
    peers = [str(a) for a in boot.get_visible_maddrs()]
    client = start_dht(peers, client_mode=True)
    try:
        yield peers, client
    finally:
        replica = RemoteExpertWorker.run_coroutine(client.replicate_p2p())
        RemoteExpertWorker.run_coroutine(replica.shutdown())
        client.shutdown()
        boot.shutdown()


@pytest.mark.parametrize("batch", [1, 2])
def test_kill_9_mid_generation_gives_identical_output(swarm, tiny_checkpoint_factory, batch):
    from transformers import AutoModelForCausalLM

    peers, client_dht = swarm
    path = tiny_checkpoint_factory("llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(
        5, local.config.vocab_size, (batch, 9), generator=torch.Generator().manual_seed(batch)
    )
    with torch.no_grad():
        expected = local.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False
        )

    prefix = f"kill9-b{batch}"
    args = ("--blocks", "0:4", "--dht-prefix", prefix)
    config = ClientConfig(request_timeout=30.0)
    with (
        running_server_process(path, peers, *args) as first,
        running_server_process(path, peers, *args) as second,
        DistributedModelForCausalLM.from_pretrained(
            str(path), dht=client_dht, dht_prefix=prefix, client_config=config
        ) as remote,
        remote.inference_session(max_length=32) as session,
    ):
        servers = {first.peer_id: first, second.peer_id: second}
        tokens, killed_at = [], None
        for step in remote.generate_stream(ids, max_new_tokens=16, session=session):
            tokens.append(step.tokens)
            if len(tokens) == 6:
                (victim,) = [hop.peer_id for hop in session.route]
                servers.pop(victim).kill()
                killed_at = time.monotonic()
        recovery = time.monotonic() - killed_at
        (survivor,) = servers
        assert [hop.peer_id for hop in session.route] == [survivor]
        assert remote.manager.bans.is_banned(victim)
    assert torch.equal(torch.cat([ids, torch.stack(tokens, dim=1)], dim=1), expected)
    assert recovery < 20, f"recovering from the killed server took {recovery:.1f} s"
