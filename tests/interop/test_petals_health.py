"""Petals' own health view of the swarm (get_remote_module_infos, `_petals.models`) reads our records."""

from __future__ import annotations

import pytest
from interop_swarm import HERE, pollinate_server, run_client

pytestmark = [pytest.mark.slow, pytest.mark.interop, pytest.mark.timeout(300)]

PREFIX = "tiny-health"


def test_petals_health_view_reads_pollinate_records(petals_python, interop_checkpoint, tmp_path):
    opts = dict(home=tmp_path, dht_prefix=PREFIX)
    with pollinate_server(interop_checkpoint, (0, 2), log=tmp_path / "a.log", **opts) as first:
        peers = first.multiaddrs
        with pollinate_server(
            interop_checkpoint, (2, 4), log=tmp_path / "b.log", initial_peers=peers, **opts
        ):
            args = [petals_python, HERE / "petals_health_script.py", "--initial-peers", *peers]
            args += ["--dht-prefix", PREFIX, "--num-blocks", "4"]
            view = run_client(
                "Petals health view", list(map(str, args)), log=tmp_path / "health.log", home=tmp_path
            )

    blocks = view["blocks"]
    assert [len(servers) for servers in blocks] == [1, 1, 1, 1], blocks
    assert blocks[0].keys() == blocks[1].keys() and blocks[2].keys() == blocks[3].keys()
    assert blocks[0].keys() != blocks[2].keys(), "two servers, each for half of the blocks"
    for servers in blocks:
        (server,) = servers.values()
        assert server["state"] == "ONLINE"
        assert server["throughput"] > 0
        assert server["torch_dtype"] == "float32" and server["quant_type"] == "none"
        assert server["cache_tokens_left"] > 0
        assert server["version"]
    assert view["models"][PREFIX]["num_blocks"] == 4
