"""Interop with Petals 2.2 for the other families it serves: BLOOM (ALiBi), Falcon (Llama: test_petals_swarm).

One mixed chain per family: a Petals server holds blocks 0:2, a Pollinate server blocks 2:4. The Petals client
and Pollinate's client each generate through both servers (so each side serves the other's client), and
both must give exactly what local transformers gives for the same checkpoint.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import make_petals_compatible
from interop_swarm import (
    MAX_NEW_TOKENS,
    PROMPT,
    assert_matches_reference,
    petals_generate,
    petals_server,
    pollinate_generate,
    pollinate_server,
    reference_for,
)

from tests.helpers.checkpoints import strip_key_prefix

pytestmark = [pytest.mark.slow, pytest.mark.interop, pytest.mark.timeout(600)]


@pytest.mark.parametrize("family", ["bloom", "falcon"])
def test_mixed_chain_of_family(family, petals_python, tmp_path):
    from engine.models.tiny import build_tiny_checkpoint

    checkpoint = make_petals_compatible(build_tiny_checkpoint(tmp_path / f"tiny-{family}", family))
    served = checkpoint
    if family == "bloom":
        # Petals' server reads BLOOM blocks as the hub repos name them ("h.0.", no "transformer."), and so do
        # we; its client (transformers 4.34) cannot read that layout with an untied head, so clients get the
        # same weights in transformers' own layout.
        served = strip_key_prefix(shutil.copytree(checkpoint, tmp_path / "tiny-bloom-hub-layout"))
    reference = reference_for(checkpoint)
    prefix = f"tiny-{family}"
    opts = dict(home=tmp_path, dht_prefix=prefix)
    with petals_server(petals_python, served, (0, 2), log=tmp_path / "petals.log", **opts) as petals:
        peers = petals.multiaddrs
        with pollinate_server(served, (2, 4), log=tmp_path / "pollinate.log", initial_peers=peers, **opts):
            theirs = petals_generate(
                petals_python, checkpoint, peers, PROMPT, MAX_NEW_TOKENS, log=tmp_path / "petals-client.log",
                **opts,
            )  # fmt: skip
            ours = pollinate_generate(
                checkpoint, peers, PROMPT, MAX_NEW_TOKENS, log=tmp_path / "pollinate-client.log", **opts
            )
    assert_matches_reference(theirs, reference)
    assert_matches_reference(ours, reference)
