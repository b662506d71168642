"""The client reports what other peers' servers computed for it: per reply, to a usage observer or a Ledger.

Two real in-process servers on 127.0.0.1 hold blocks [0, 2) and [2, 4) of a tiny llama; the client routes
through both and must report each server's peer id with batch x input tokens and the span's 2 blocks.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import pytest
import torch

from engine.client.model import DistributedModelForCausalLM
from engine.ledger import Ledger, LedgerPolicy
from tests.helpers.servers import running_server

PREFIX = "usage-llama"
SPANS = ((0, 2), (2, 4))


@pytest.fixture(scope="module")
def swarm(bootstrap, tiny_checkpoint_factory):
    """The checkpoint and the server peer ids by span, with both servers running for the whole module."""
    path = tiny_checkpoint_factory("llama")
    with contextlib.ExitStack() as stack:
        peers = {}
        for start, end in SPANS:
            host = stack.enter_context(
                running_server(path, bootstrap, start_block=start, end_block=end, dht_prefix=PREFIX)
            )
            peers[start, end] = host.info().peer_id
        yield path, peers


@pytest.fixture
def client(swarm, client_dht):
    """Builds client models with a given usage observer; closes them after the test."""
    path, _ = swarm
    made = []

    def make(observer):
        model = DistributedModelForCausalLM.from_pretrained(
            str(path), dht=client_dht, dht_prefix=PREFIX, usage_observer=observer
        )
        made.append(model)
        return model

    yield make
    for model in made:
        model.close()


class Recorder:
    """A usage observer that keeps every call."""

    def __init__(self):
        self.calls: list[tuple[str, int, int, float]] = []

    def __call__(self, peer_id: str, tokens: int, blocks: int, seconds: float) -> None:
        self.calls.append((peer_id, tokens, blocks, seconds))

    def by_peer(self) -> dict[str, list[tuple[int, int, float]]]:
        grouped = defaultdict(list)
        for peer_id, tokens, blocks, seconds in self.calls:
            grouped[peer_id].append((tokens, blocks, seconds))
        return dict(grouped)


def prompt(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(5, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("batch", "length", "new_tokens"), [(1, 7, 5), (2, 4, 3)])
def test_generation_reports_each_hop(swarm, client, batch, length, new_tokens):
    _, peers = swarm
    recorder = Recorder()
    model = client(recorder)
    out = model.generate(prompt(batch, length, seed=length), max_new_tokens=new_tokens, eos_token_id=None)
    steps = out.shape[1] - length
    assert steps == new_tokens

    by_peer = recorder.by_peer()
    assert set(by_peer) == set(peers.values())
    for (start, end), peer_id in peers.items():
        calls = by_peer[peer_id]
        # The prefill sends the whole prompt, then each step one token; the last token is never sent.
        assert [tokens for tokens, _, _ in calls] == [batch * length] + [batch] * (steps - 1)
        assert all(blocks == end - start for _, blocks, _ in calls)
        assert all(seconds >= 0 for _, _, seconds in calls)


def test_forward_and_backward_report_each_hop(swarm, client):
    _, peers = swarm
    recorder = Recorder()
    model = client(recorder)
    hidden = torch.randn(2, 6, model.config.hidden_size, requires_grad=True)

    outputs = model.blocks(hidden)
    forward_calls = list(recorder.calls)
    outputs.square().sum().backward()
    backward_calls = recorder.calls[len(forward_calls) :]

    assert hidden.grad is not None and hidden.grad.shape == hidden.shape
    expected = {(peer_id, 2 * 6, end - start) for (start, end), peer_id in peers.items()}
    for calls in (forward_calls, backward_calls):
        assert len(calls) == len(peers)
        assert {(peer_id, tokens, blocks) for peer_id, tokens, blocks, _ in calls} == expected
    # The backward pass runs the hops in reverse.
    assert [call[0] for call in backward_calls] == [call[0] for call in reversed(forward_calls)]


def test_a_raising_observer_does_not_break_generation(client):
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("ledger on fire")

    ids = prompt(1, 5, seed=3)
    reference = client(None).generate(ids, max_new_tokens=4, eos_token_id=None)
    model = client(broken)
    assert torch.equal(model.generate(ids, max_new_tokens=4, eos_token_id=None), reference)
    hidden = torch.randn(1, 3, model.config.hidden_size, requires_grad=True)
    model.blocks(hidden).sum().backward()
    assert hidden.grad is not None
    assert len(calls) == 4 * len(SPANS) + 2 * len(SPANS)


def test_ledger_credits_the_servers_that_worked_for_us(swarm, client):
    _, peers = swarm
    policy = LedgerPolicy(token_blocks_per_point=10.0)
    ledger = Ledger(policy)
    model = client(ledger.record_consumed)
    batch, length, new_tokens = 1, 8, 6
    model.generate(prompt(batch, length, seed=8), max_new_tokens=new_tokens, eos_token_id=None)

    tokens = batch * (length + new_tokens - 1)
    for (start, end), peer_id in peers.items():
        seen = ledger.contribution(peer_id)
        assert seen is not None
        assert seen.consumed_token_blocks == tokens * (end - start)
        assert seen.credit == pytest.approx(tokens * (end - start) / 10.0, rel=1e-3)
        assert ledger.priority_of(peer_id) > 1.0
        assert ledger.priority_delay(peer_id) < policy.base_delay
    assert ledger.priority_of("QmStrangerWhoNeverServedUs") == 1.0
    summary = ledger.summary()
    assert summary["consumed_requests"] == new_tokens * len(peers)
    assert summary["consumed_tokens"] == tokens * len(peers)
