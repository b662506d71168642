"""The client against real block servers on 127.0.0.1: generation equals local transformers, token for token.

Servers run in this process (BlockHost) and are shared by the cases of a module-scoped swarm; each
architecture gets a 2-server and a 3-server chain under its own dht_prefix.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.client.model import DistributedModelForCausalLM
from engine.client.routing import MissingBlocksError
from engine.client.sampling import SamplingParams
from tests.helpers.servers import running_server

ARCHS = ("llama", "mistral", "qwen2")
# Families added later get one lean case each, alternating the topologies (greedy tokens and logits), so
# the suite stays short.
MORE_ARCHS = (("qwen3", "2servers"), ("mixtral", "3servers"), ("falcon", "2servers"), ("bloom", "3servers"))
TOPOLOGIES = {"2servers": ((0, 2), (2, 4)), "3servers": ((0, 1), (1, 3), (3, 4))}
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def swarms(bootstrap, tiny_checkpoint_factory):
    """Lazily started chains of servers, one per (arch, topology), stopped at the end of the module."""
    from concurrent.futures import ThreadPoolExecutor

    running = []
    started: dict[tuple[str, str], str] = {}

    def get(arch: str, topology: str) -> tuple[str, object]:
        key = (arch, topology)
        path = tiny_checkpoint_factory(arch)
        if key not in started:
            prefix = f"{arch}-{topology}"
            for start, end in TOPOLOGIES[topology]:
                server = running_server(path, bootstrap, start_block=start, end_block=end, dht_prefix=prefix)
                server.__enter__()
                running.append(server)
            started[key] = prefix
        return started[key], path

    try:
        yield get
    finally:
        # Stopping is mostly waiting (an OFFLINE announcement, a DHT peer's shutdown): about 20 servers stop
        # side by side instead of one after another (17 s). Each stop is thread-safe and always runs.
        with ThreadPoolExecutor(len(running) or 1) as pool:
            for future in [pool.submit(server.__exit__, None, None, None) for server in running]:
                future.result()


@pytest.fixture(scope="module")
def models(swarms, client_dht):
    """Client models by (arch, topology), with the local transformers model of the same weights."""
    from transformers import AutoModelForCausalLM

    made = {}

    def get(arch: str, topology: str):
        if (arch, topology) not in made:
            prefix, path = swarms(arch, topology)
            remote = DistributedModelForCausalLM.from_pretrained(str(path), dht=client_dht, dht_prefix=prefix)
            local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            made[arch, topology] = remote, local
        return made[arch, topology]

    yield get
    for remote, _ in made.values():
        remote.close()


def local_generate(local, ids, max_new_tokens=NEW_TOKENS, **kwargs):
    with torch.no_grad():
        return local.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, **kwargs
        )


def random_ids(vocab_size: int, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(5, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("batch", "length"), [(1, 1), (1, 7), (1, 64), (2, 7), (2, 64)])
def test_greedy_generation_matches_transformers(models, arch, topology, batch, length):
    remote, local = models(arch, topology)
    ids = random_ids(local.config.vocab_size, batch, length, seed=length * 10 + batch)
    ours = remote.generate(ids, max_new_tokens=NEW_TOKENS)
    assert torch.equal(ours, local_generate(local, ids))


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(models, arch, topology):
    remote, local = models(arch, topology)
    ids = random_ids(local.config.vocab_size, 2, 12, seed=5)
    with torch.no_grad():
        expected = local(ids).logits
    with remote.inference_session(max_length=16) as session:
        prefill = remote.session_logits(session, ids[:, :-1])
        last = remote.session_logits(session, ids[:, -1:])
        assert len(session.route) == len(TOPOLOGIES[topology])
    torch.testing.assert_close(prefill, expected[:, -2], atol=1e-4, rtol=0)
    torch.testing.assert_close(last, expected[:, -1], atol=1e-4, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(remote.forward(ids), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("arch", "topology"), MORE_ARCHS)
def test_more_families_generate_and_score_like_transformers(models, arch, topology):
    remote, local = models(arch, topology)
    ids = random_ids(local.config.vocab_size, 2, 7, seed=27)
    assert torch.equal(remote.generate(ids, max_new_tokens=NEW_TOKENS), local_generate(local, ids))
    with torch.no_grad():
        expected = local(ids).logits
    with remote.inference_session(max_length=16) as session:
        prefill = remote.session_logits(session, ids[:, :-1])
        last = remote.session_logits(session, ids[:, -1:])
        assert len(session.route) == len(TOPOLOGIES[topology])
    torch.testing.assert_close(prefill, expected[:, -2], atol=1e-4, rtol=0)
    torch.testing.assert_close(last, expected[:, -1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_turn_session_matches_whole_conversation(models, arch):
    remote, local = models(arch, "2servers")
    turn1 = random_ids(local.config.vocab_size, 1, 6, seed=1)
    turn2 = random_ids(local.config.vocab_size, 1, 4, seed=2)
    with remote.inference_session(max_length=64) as session:
        out1 = remote.generate(turn1, session=session, max_new_tokens=8)
        position = session.position
        out2 = remote.generate(turn2, session=session, max_new_tokens=8)
        # the servers kept their caches: only the new turn (and turn 1's last token) was sent
        assert position == 6 + 7 and session.position == position + 1 + 4 + 7
    assert torch.equal(out1, local_generate(local, turn1, 8))
    conversation = torch.cat([out1, turn2], dim=1)
    assert torch.equal(out2[:, 4:], local_generate(local, conversation, 8)[:, conversation.shape[1] :])


def test_streaming_yields_tokens_as_they_come(models):
    remote, local = models("llama", "3servers")
    ids = random_ids(local.config.vocab_size, 1, 5, seed=9)
    steps = list(remote.generate_stream(ids, max_new_tokens=6))
    assert len(steps) == 6 and all(step.tokens.shape == (1,) for step in steps)
    tokens = torch.stack([step.tokens for step in steps], dim=1)
    assert torch.equal(tokens, local_generate(local, ids, 6)[:, 5:])
    text = "".join(step.text[0] for step in steps)
    assert text == remote.tokenizer.decode(tokens[0], skip_special_tokens=True)


def test_sampling_with_a_seed_is_reproducible(models):
    remote, local = models("qwen2", "2servers")
    ids = random_ids(local.config.vocab_size, 1, 5, seed=3)
    params = dict(max_new_tokens=8, do_sample=True, temperature=1.3, top_p=0.9, top_k=40, seed=1234)
    first = remote.generate(ids, **params)
    second = remote.generate(ids, **params)
    assert torch.equal(first, second)
    others = {tuple(remote.generate(ids, **dict(params, seed=s))[0].tolist()) for s in range(3)}
    assert len(others | {tuple(first[0].tolist())}) > 1


def test_stop_strings(models):
    remote, local = models("llama", "2servers")
    ids = random_ids(local.config.vocab_size, 1, 5, seed=4)
    full = remote.generate(ids, max_new_tokens=12)
    text = remote.tokenizer.decode(full[0, 5:], skip_special_tokens=True)
    stop = text[len(text) // 2 :][:3]
    steps = list(remote.generate_stream(ids, SamplingParams(max_new_tokens=12, stop=(stop,))))
    assert len(steps) < 12 and stop in "".join(step.text[0] for step in steps)


def test_forward_and_backward_match_local_gradients(models):
    remote, local = models("mistral", "3servers")
    ids = random_ids(local.config.vocab_size, 2, 9, seed=6)
    embeds = local.model.embed_tokens(ids).detach()

    ours = embeds.clone().requires_grad_(True)
    remote.head.logits(remote.blocks(ours)).logsumexp(-1).sum().backward()
    theirs = embeds.clone().requires_grad_(True)
    local(inputs_embeds=theirs).logits.logsumexp(-1).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-4, rtol=1e-4)


def test_missing_blocks_are_named(swarms, client_dht, bootstrap, tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama")
    with running_server(path, bootstrap, start_block=0, end_block=1, dht_prefix="partial"):
        from engine.client.bans import RetryPolicy
        from engine.client.sequence_manager import ClientConfig

        config = ClientConfig(retry=RetryPolicy(max_retries=1))
        remote = DistributedModelForCausalLM.from_pretrained(
            str(path), dht=client_dht, dht_prefix="partial", client_config=config
        )
        with remote, pytest.raises(MissingBlocksError) as info:
            remote.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    assert info.value.missing_blocks == (1, 2, 3)
    assert "1-3 of 4" in str(info.value)


def test_server_stopped_mid_generation_is_replaced(client_dht, bootstrap, tiny_checkpoint_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint_factory("llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = random_ids(local.config.vocab_size, 1, 7, seed=11)
    expected = local_generate(local, ids, 12)
    with (
        running_server(path, bootstrap, start_block=0, end_block=4, dht_prefix="failover") as first,
        running_server(path, bootstrap, start_block=0, end_block=4, dht_prefix="failover") as second,
        DistributedModelForCausalLM.from_pretrained(
            str(path), dht=client_dht, dht_prefix="failover"
        ) as remote,
        remote.inference_session(max_length=32) as session,
    ):
        hosts = {first.info().peer_id: first, second.info().peer_id: second}
        tokens = []
        for step in remote.generate_stream(ids, max_new_tokens=12, session=session):
            tokens.append(step.tokens)
            if len(tokens) == 4:
                (used,) = [hop.peer_id for hop in session.route]
                hosts.pop(used).stop()
        (survivor,) = hosts
        assert [hop.peer_id for hop in session.route] == [survivor]
        assert remote.manager.bans.is_banned(used)
    assert torch.equal(torch.cat([ids, torch.stack(tokens, dim=1)], dim=1), expected)


def test_cli_generate_prints_tokens(swarms, bootstrap):
    import argparse
    import io

    from engine.client import cli

    prefix, path = swarms("llama", "2servers")
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers())
    args = parser.parse_args(
        [
            "generate",
            str(path),
            "--prompt",
            "Hello! How are",
            "--initial-peers",
            *bootstrap,
            "--dht-prefix",
            prefix,
            "--max-new-tokens",
            "5",
        ]
    )
    out = io.StringIO()
    assert args.handler(args, out=out) == 0
    remote_text = out.getvalue()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("Hello! How are")])
    expected = tokenizer.decode(local_generate(local, ids, 5)[0, ids.shape[1] :], skip_special_tokens=True)
    assert remote_text == expected + "\n"


def test_rpc_info_is_fetched_once_per_server(models, monkeypatch):
    from engine.client import protocol

    remote, local = models("qwen2", "3servers")
    calls = []
    original = protocol.fetch_rpc_info

    async def counting(p2p, peer_id, *args, **kwargs):
        calls.append(peer_id)
        return await original(p2p, peer_id, *args, **kwargs)

    monkeypatch.setattr(protocol, "fetch_rpc_info", counting)
    remote.manager._rpc_infos.clear()
    ids = random_ids(local.config.vocab_size, 1, 3, seed=8)
    remote.generate(ids, max_new_tokens=3)
    remote.generate(ids, max_new_tokens=3)
    assert len(calls) == 3 and len(set(calls)) == 3


class _OracleDrafter:
    """Drafts the true greedy continuation, corrupting every other proposal (so rollbacks happen too)."""

    def __init__(self, truth: list[int], prompt_length: int):
        self.truth, self.prompt_length, self.calls = truth, prompt_length, 0

    def draft(self, history, k):
        self.calls += 1
        done = len(history) - self.prompt_length
        proposal = list(self.truth[done : done + k])
        if proposal and self.calls % 2 == 0:
            proposal[-1] = (proposal[-1] + 1) % 512
        return proposal, None


class _OracleTreeDrafter(_OracleDrafter):
    """Trees: the true continuation with a wrong sibling at every depth; every third tree puts a wrong root
    first and leaves the truth out (a round that keeps only the model's own token)."""

    name = "oracle_tree"

    def propose(self, history, k):
        return [], None, None

    def propose_tree(self, history, max_rows, row_cost):
        from engine.client.draft_tree import DraftTree

        self.calls += 1
        done = len(history) - self.prompt_length
        tree = DraftTree()
        if self.calls % 3 == 0:
            tree.add((self.truth[done] + 1) % 512, -1)
            return tree
        parent = -1
        for token in self.truth[done : done + max_rows // 2]:
            tree.add((token + 3) % 512, parent)
            parent = tree.add(token, parent)
        return tree

    def observe(self, tree, path):
        pass


@pytest.mark.parametrize("drafter", ["oracle", "prompt-lookup", "tree-oracle"])
def test_speculative_greedy_with_push_matches_transformers(models, drafter):
    """Speculation through a 3-server chain (push on, caches rolled back or trees compacted) gives local
    greedy's tokens."""
    from engine.client.speculative import SpeculationConfig, SpeculationStats

    remote, local = models("llama", "3servers")
    ids = torch.tensor([[7, 8, 9, 10, 7, 8, 9, 10, 7, 8]])
    expected = local_generate(local, ids, max_new_tokens=20)
    config = SpeculationConfig()
    if drafter == "oracle":
        config = SpeculationConfig(drafter=_OracleDrafter(expected[0, 10:].tolist(), 10))
    if drafter == "tree-oracle":
        config = SpeculationConfig(drafter=_OracleTreeDrafter(expected[0, 10:].tolist(), 10))
    stats = SpeculationStats()
    default = remote.manager.config
    remote.manager.config = dataclasses.replace(default, push_min_rtt=0.0)  # push even on loopback
    try:
        with remote.inference_session(max_length=40) as session:
            assert session.can_roll_back  # our servers announce start_from_position
            assert session.can_take_trees  # and tree_steps
            output = remote.generate(ids, max_new_tokens=20, session=session, speculation=config, stats=stats)
    finally:
        remote.manager.config = default
    assert torch.equal(output, expected)
    assert stats.tokens == 20
    if drafter == "oracle":
        assert 0 < stats.accepted < stats.drafted  # some drafts kept, some rolled back
        assert stats.rounds < 20 and stats.tree_rounds == 0
    else:  # greedy on a route that takes trees: prompt lookup's candidates go as trees
        assert stats.tree_rounds > 0 and stats.accepted > 0
    if drafter == "tree-oracle":
        assert stats.rounds <= 12 and stats.accepted < stats.drafted


def test_every_step_reaches_the_later_servers_by_push_alone(models, monkeypatch):
    """With push on, the servers after the first get each step, the prompt included (their sessions were
    opened ahead), from the server before them: the client's own copies are dropped here, and the tokens
    still equal local greedy's."""
    from hivemind.utils import MSGPackSerializer

    from engine.client import inference_session

    remote, local = models("llama", "3servers")
    ids = torch.tensor([[5, 9, 33, 2, 17, 4]])
    expected = local_generate(local, ids, max_new_tokens=6)
    send = inference_session._SpanStream._send
    dropped = []

    async def send_all_but_copies(stream, request):
        metadata = MSGPackSerializer.loads(request.metadata)
        is_step = request.tensors and request.tensors[0].size[1] > 0
        if stream.hop.start > 0 and is_step and "max_length" not in metadata:
            dropped.append(stream.hop.start)  # a copy of what the previous server pushes: not sent
            return
        await send(stream, request)

    monkeypatch.setattr(inference_session._SpanStream, "_send", send_all_but_copies)
    default = remote.manager.config
    remote.manager.config = dataclasses.replace(default, push_min_rtt=0.0, request_timeout=15.0)
    try:
        output = remote.generate(ids, max_new_tokens=6)
    finally:
        remote.manager.config = default
    assert torch.equal(output, expected)
    assert sorted(dropped) == [1] * 6 + [3] * 6  # each step's copy for the 2nd and 3rd server, prompt too


def test_routing_learns_round_trips_only_from_steps_not_pushed(models, monkeypatch):
    """A pushed step's reply is there before the client asks, so its wait is no round trip: the servers
    after the first, pushed to at every step (the prompt too), teach min-latency routing nothing from steps;
    with push off, every server's steps are round trips again."""
    remote, local = models("llama", "3servers")
    ids = torch.tensor([[5, 9, 33, 2, 17, 4]])
    expected = local_generate(local, ids, max_new_tokens=6)
    observed = []
    monkeypatch.setattr(remote.manager, "observe_rtt", lambda peer_id, seconds: observed.append(peer_id))
    default = remote.manager.config
    try:
        for push in (True, False):
            remote.manager.config = dataclasses.replace(default, push_min_rtt=0.0, server_to_server=push)
            observed.clear()
            with remote.inference_session(max_length=16) as session:
                assert torch.equal(remote.generate(ids, max_new_tokens=6, session=session), expected)
                peers = [stream.hop.peer_id for stream in session._streams]
            assert len(set(peers)) == 3
            first_only = [peers[0]] * 6  # the prompt and five single-token steps
            assert observed == (first_only if push else [peer for _ in range(6) for peer in peers])
    finally:
        remote.manager.config = default


def test_early_exit_speculation_through_the_swarm_matches_transformers(models):
    """The client drafts with the model's own first 3 blocks (of 4), the swarm verifies: local greedy's
    tokens; the blocks load once per model."""
    from engine.client.speculative import SpeculationConfig, SpeculationStats

    remote, local = models("llama", "3servers")
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    expected = local_generate(local, ids, max_new_tokens=16)
    config = SpeculationConfig(draft_blocks=3)
    stats = SpeculationStats()
    output = remote.generate(ids, max_new_tokens=16, speculation=config, stats=stats)
    assert torch.equal(output, expected)
    assert stats.tokens == 16 and stats.drafted > 0
    assert remote.early_exit_blocks(3, config.max_draft_bytes).num_blocks == 3
    assert remote.early_exit_blocks(4, config.max_draft_bytes) is None  # all blocks: no drafter


def test_feature_speculation_with_push_gets_aligned_features_and_matches_transformers(models):
    """A feature drafter through a 3-server chain with push: at every call the features it gets equal local
    transformers' last-block outputs for all tokens but the last (across rollbacks), and the output is
    local greedy's."""
    from engine.client.speculative import SpeculationConfig, SpeculationStats
    from tests.helpers.feature_drafters import CheckingFeatureDrafter

    remote, local = models("llama", "3servers")
    ids = random_ids(local.config.vocab_size, 1, 9, seed=41)
    expected = local_generate(local, ids, max_new_tokens=20)
    drafters = []

    def new_drafter():  # the model asks for one per generation (a drafter keeps a cache)
        drafters.append(CheckingFeatureDrafter(local, wrong_every=2, atol=1e-3))
        return drafters[-1]

    default = remote.manager.config
    remote.manager.config = dataclasses.replace(default, push_min_rtt=0.0)  # push even on loopback
    try:
        config = SpeculationConfig(feature_drafter=new_drafter, learn_cost=False, lookup_min_match=0)
        for _ in range(2):
            stats = SpeculationStats()
            output = remote.generate(ids, max_new_tokens=20, speculation=config, stats=stats)
            assert torch.equal(output, expected)
            assert 0 < stats.accepted < stats.drafted and drafters[-1].calls >= 3
    finally:
        remote.manager.config = default
    assert len(drafters) == 2


def test_a_feature_drafter_folder_drafts_through_the_swarm_and_one_for_another_model_is_refused(
    models, tmp_path, tiny_checkpoint_factory
):
    """SpeculationConfig(feature_drafter=FOLDER) loads a saved drafter (untrained here: the output must be
    greedy's whatever it drafts); one saved for another model's weights is refused with a clear error, and
    "auto" without a shipped drafter for this model drafts by prompt lookup."""
    from engine.client.feature_drafter import (
        DrafterConfig,
        DrafterMismatchError,
        FeatureDrafterModel,
        save_feature_drafter,
    )
    from engine.client.speculative import SpeculationConfig, SpeculationStats
    from engine.models import load_client_parts

    remote, local = models("llama", "3servers")
    ids = random_ids(local.config.vocab_size, 1, 8, seed=43)
    expected = local_generate(local, ids, max_new_tokens=12)
    torch.manual_seed(0)
    ours = save_feature_drafter(
        FeatureDrafterModel(DrafterConfig.for_target(remote.config, remote.head, ["tiny"])), tmp_path / "ours"
    )
    other_head = load_client_parts(tiny_checkpoint_factory("llama", seed=9))
    theirs = save_feature_drafter(
        FeatureDrafterModel(DrafterConfig.for_target(remote.config, other_head, ["tiny-9"])),
        tmp_path / "theirs",
    )
    stats = SpeculationStats()
    config = SpeculationConfig(feature_drafter=str(ours), lookup_min_match=0)
    assert torch.equal(remote.generate(ids, max_new_tokens=12, speculation=config, stats=stats), expected)
    assert stats.drafter == "feature" and stats.drafted > 0
    with pytest.raises(DrafterMismatchError, match="trained for tiny-9"):
        remote.generate(ids, max_new_tokens=2, speculation=SpeculationConfig(feature_drafter=str(theirs)))
    stats = SpeculationStats()
    remote.generate(ids, max_new_tokens=4, speculation=SpeculationConfig(), stats=stats)  # "auto"
    assert stats.drafter == "prompt_lookup"
