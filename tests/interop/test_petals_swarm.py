"""Interop with the published Petals 2.2: Petals and Pollinate servers and clients in one swarm.

Each test starts its servers as subprocesses on 127.0.0.1 (Petals ones in the Petals venv), runs one
client to completion, and checks that greedy generation and a forward pass give exactly what local
transformers gives for the same checkpoint.
"""

from __future__ import annotations

import pytest
from interop_swarm import (
    MAX_NEW_TOKENS,
    PROMPT,
    assert_matches_reference,
    petals_generate,
    petals_server,
    pollinate_generate,
    pollinate_server,
)

pytestmark = [pytest.mark.slow, pytest.mark.interop, pytest.mark.timeout(600)]

PREFIX = "tiny-interop"


def test_petals_only_swarm(petals_python, interop_checkpoint, reference, tmp_path):
    """Petals server + Petals client: validates the Petals venv and the shared checkpoint."""
    opts = dict(home=tmp_path, dht_prefix=PREFIX)
    with petals_server(
        petals_python, interop_checkpoint, (0, 4), log=tmp_path / "server.log", **opts
    ) as server:
        result = petals_generate(
            petals_python, interop_checkpoint, server.multiaddrs, PROMPT, MAX_NEW_TOKENS,
            log=tmp_path / "client.log", **opts,
        )  # fmt: skip
    assert_matches_reference(result, reference)


def test_petals_client_through_pollinate_servers(petals_python, interop_checkpoint, reference, tmp_path):
    """The Petals client chains two Pollinate servers (it asks them to push hidden states to each other)."""
    opts = dict(home=tmp_path, dht_prefix=PREFIX)
    with pollinate_server(interop_checkpoint, (0, 2), log=tmp_path / "server-a.log", **opts) as first:
        peers = first.multiaddrs
        with pollinate_server(
            interop_checkpoint, (2, 4), log=tmp_path / "server-b.log", initial_peers=peers, **opts
        ):
            result = petals_generate(
                petals_python, interop_checkpoint, peers, PROMPT, MAX_NEW_TOKENS,
                log=tmp_path / "client.log", **opts,
            )  # fmt: skip
    assert_matches_reference(result, reference)


def test_pollinate_client_through_petals_server(petals_python, interop_checkpoint, reference, tmp_path):
    """Pollinate's client generates through a Petals server that holds every block."""
    opts = dict(home=tmp_path, dht_prefix=PREFIX)
    with petals_server(
        petals_python, interop_checkpoint, (0, 4), log=tmp_path / "server.log", **opts
    ) as server:
        result = pollinate_generate(
            interop_checkpoint, server.multiaddrs, PROMPT, MAX_NEW_TOKENS, log=tmp_path / "client.log", **opts
        )
    assert_matches_reference(result, reference)


@pytest.fixture(scope="module")
def mixed_chain(petals_python, interop_checkpoint, tmp_path_factory):
    """A Petals server for blocks 0:2 and a Pollinate server for blocks 2:4, shared by the client tests."""
    home = tmp_path_factory.mktemp("mixed-chain")
    opts = dict(home=home, dht_prefix=PREFIX)
    with petals_server(petals_python, interop_checkpoint, (0, 2), log=home / "petals.log", **opts) as petals:
        peers = petals.multiaddrs
        with pollinate_server(
            interop_checkpoint, (2, 4), log=home / "pollinate.log", initial_peers=peers, **opts
        ):
            yield peers, home


@pytest.mark.parametrize("client", ["petals", "pollinate", "pollinate-speculative"])
def test_mixed_chain(client, mixed_chain, petals_python, interop_checkpoint, reference, tmp_path):
    """Either client runs blocks 0:2 on a Petals server and blocks 2:4 on a Pollinate server.

    Besides inference and forward, the client backpropagates through both servers (rpc_backward). Our
    client asks the Petals server to push to ours; with speculation on, it sees that the Petals server
    cannot roll its cache back (nor take token trees) and falls back to one-token steps.
    """
    peers, home = mixed_chain
    opts = dict(log=tmp_path / f"{client}-client.log", home=home, dht_prefix=PREFIX, backward=True)
    if client == "petals":
        result = petals_generate(petals_python, interop_checkpoint, peers, PROMPT, MAX_NEW_TOKENS, **opts)
    else:
        speculate = client == "pollinate-speculative"
        result = pollinate_generate(
            interop_checkpoint, peers, PROMPT, MAX_NEW_TOKENS, speculate=speculate, **opts
        )
        if speculate:
            counters = result["speculation"]
            assert counters["drafted"] == 0 and counters["fallback_rounds"] == counters["rounds"] > 0
            assert counters["tree_rounds"] == 0  # nor token trees: the Petals server announces no tree_steps
    assert "embeds_grad" in result
    assert_matches_reference(result, reference)
