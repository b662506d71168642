"""Interop by hub id: with no --dht-prefix, both sides derive Petals' default prefix from the repo id.

The repo is served from a local Hugging Face cache (offline), so the test needs no network.
"""

from __future__ import annotations

import pytest
from interop_swarm import (
    MAX_NEW_TOKENS,
    PROMPT,
    assert_matches_reference,
    install_in_hub_cache,
    petals_generate,
    petals_server,
    pollinate_generate,
    pollinate_server,
)

pytestmark = [pytest.mark.slow, pytest.mark.interop, pytest.mark.timeout(600)]

# Petals' rule for Llama: repo name without the owner, "." -> "-", plus "-hf": "Tiny-Llama-2-0-hf".
REPO_ID = "pollinate-test/Tiny-Llama-2.0"


def test_petals_client_finds_pollinate_server_by_repo_id(
    petals_python, interop_checkpoint, reference, tmp_path
):
    install_in_hub_cache(interop_checkpoint, REPO_ID, tmp_path)
    with pollinate_server(
        REPO_ID, (0, 4), log=tmp_path / "server.log", home=tmp_path, dht_prefix=None
    ) as server:
        assert "dht_prefix Tiny-Llama-2-0-hf" in server.log.read_text()
        result = petals_generate(
            petals_python, REPO_ID, server.multiaddrs, PROMPT, MAX_NEW_TOKENS,
            log=tmp_path / "client.log", home=tmp_path,
        )  # fmt: skip
    assert_matches_reference(result, reference)


def test_pollinate_client_finds_petals_server_by_repo_id(
    petals_python, interop_checkpoint, reference, tmp_path
):
    install_in_hub_cache(interop_checkpoint, REPO_ID, tmp_path)
    log = tmp_path / "server.log"
    with petals_server(petals_python, REPO_ID, (0, 4), log=log, home=tmp_path, dht_prefix=None) as server:
        assert "Tiny-Llama-2-0-hf" in log.read_text()
        result = pollinate_generate(
            REPO_ID, server.multiaddrs, PROMPT, MAX_NEW_TOKENS, log=tmp_path / "client.log", home=tmp_path
        )
    assert_matches_reference(result, reference)
