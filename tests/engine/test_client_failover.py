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


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_kill_9_mid_speculation_gives_identical_output(swarm, tiny_checkpoint_factory, kind):
    """A server dies while speculative rounds run (drafts partly rejected; chains, or token trees whose
    other rows are dropped): the replacement replays the kept prefix only, and the output is still local
    greedy's."""
    from transformers import AutoModelForCausalLM

    from engine.client.speculative import SpeculationConfig, SpeculationStats

    peers, client_dht = swarm
    path = tiny_checkpoint_factory("llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(5, local.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = local.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
        )
    truth = expected[0, 9:].tolist()

    class HalfRightDrafter:
        calls = 0

        def draft(self, history, k):
            self.calls += 1
            done = len(history) - 9
            proposal = list(truth[done : done + k])
            if proposal and self.calls % 2:
                proposal[-1] = (proposal[-1] + 1) % 512  # rejected: the caches must roll back
            return proposal, None

    class HalfRightTrees(HalfRightDrafter):
        def propose(self, history, k):
            return [], None, None

        def propose_tree(self, history, max_rows, row_cost):
            from engine.client.draft_tree import DraftTree

            tree, parent = DraftTree(), -1
            for token in self.draft(history, 3)[0]:  # the chain, with a wrong sibling at each depth
                tree.add((token + 7) % 512, parent)
                parent = tree.add(token, parent)
            return tree

        def observe(self, tree, path):
            pass

    prefix = f"kill9-spec-{kind}"
    args = ("--blocks", "0:4", "--dht-prefix", prefix)
    stats = SpeculationStats()
    with (
        running_server_process(path, peers, *args) as first,
        running_server_process(path, peers, *args) as second,
        DistributedModelForCausalLM.from_pretrained(
            str(path),
            dht=client_dht,
            dht_prefix=prefix,
            client_config=ClientConfig(request_timeout=30.0, push_min_rtt=0.0),
        ) as remote,
        remote.inference_session(max_length=40) as session,
    ):
        servers = {first.peer_id: first, second.peer_id: second}
        tokens = []
        config = SpeculationConfig(drafter=HalfRightDrafter() if kind == "chain" else HalfRightTrees())
        for step in remote.generate_stream(
            ids, max_new_tokens=24, session=session, speculation=config, stats=stats
        ):
            tokens.append(step.tokens)
            if len(tokens) >= 8 and len(servers) == 2:
                (victim,) = [hop.peer_id for hop in session.route]
                servers.pop(victim).kill()
        assert [hop.peer_id for hop in session.route] == list(servers)
    assert torch.equal(torch.cat([ids, torch.stack(tokens, dim=1)], dim=1), expected)
    assert 0 < stats.accepted < stats.drafted
    assert (stats.tree_rounds > 0) == (kind == "tree")


def test_kill_9_mid_feature_speculation_with_push_gives_identical_output(swarm, tiny_checkpoint_factory):
    """A chain of two spans with push; a feature drafter drafts (partly rejected). The second span's server
    dies mid-generation: the replacement replays the kept prefix, the features the drafter gets stay those
    of local transformers (checked at every call), and the output is local greedy's."""
    from transformers import AutoModelForCausalLM

    from engine.client.speculative import SpeculationConfig, SpeculationStats
    from tests.helpers.feature_drafters import CheckingFeatureDrafter

    peers, client_dht = swarm
    path = tiny_checkpoint_factory("llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(5, local.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = local.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
        )

    prefix = "kill9-feat"
    stats = SpeculationStats()
    drafter = CheckingFeatureDrafter(local, wrong_every=2, atol=1e-3)
    with (
        running_server_process(path, peers, "--blocks", "0:2", "--dht-prefix", prefix),
        running_server_process(path, peers, "--blocks", "2:4", "--dht-prefix", prefix) as second,
        running_server_process(path, peers, "--blocks", "2:4", "--dht-prefix", prefix) as third,
        DistributedModelForCausalLM.from_pretrained(
            str(path),
            dht=client_dht,
            dht_prefix=prefix,
            client_config=ClientConfig(request_timeout=30.0, push_min_rtt=0.0),
        ) as remote,
        remote.inference_session(max_length=40) as session,
    ):
        tails = {second.peer_id: second, third.peer_id: third}
        tokens, calls_at_kill = [], None
        config = SpeculationConfig(drafter=drafter, learn_cost=False, lookup_min_match=0)
        for step in remote.generate_stream(
            ids, max_new_tokens=24, session=session, speculation=config, stats=stats
        ):
            tokens.append(step.tokens)
            if len(tokens) >= 8 and calls_at_kill is None:
                victim = session.route[-1].peer_id
                tails.pop(victim).kill()
                calls_at_kill = drafter.calls
        assert session.route[-1].peer_id == next(iter(tails))
    assert torch.equal(torch.cat([ids, torch.stack(tokens, dim=1)], dim=1), expected)
    assert 0 < stats.accepted < stats.drafted
    assert drafter.calls > calls_at_kill  # drafted (and checked its features) after the failover
