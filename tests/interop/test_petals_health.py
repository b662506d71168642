"""Health views of a mixed swarm: Petals' reads our records, and `pollinate-engine health` reads Petals'."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from interop_swarm import HERE, REPO_ROOT, base_env, petals_server, pollinate_server, run_client

pytestmark = [pytest.mark.slow, pytest.mark.interop, pytest.mark.timeout(300)]

PREFIX = "tiny-health"


def test_health_views_of_a_mixed_swarm(petals_python, interop_checkpoint, tmp_path):
    opts = dict(home=tmp_path, dht_prefix=PREFIX)
    with petals_server(petals_python, interop_checkpoint, (2, 4), log=tmp_path / "a.log", **opts) as first:
        peers = first.multiaddrs
        with pollinate_server(
            interop_checkpoint, (0, 2), log=tmp_path / "b.log", initial_peers=peers, **opts
        ):
            # Our server asks the swarm to dial it back: the Petals server's rpc_check does (wire-compatible).
            assert _wait_for_line(tmp_path / "b.log", "reachability: reachable (1 of 1 helpers dialled back)")
            args = [petals_python, HERE / "petals_health_script.py", "--initial-peers", *peers]
            args += ["--dht-prefix", PREFIX, "--num-blocks", "4"]
            view = run_client(
                "Petals health view", list(map(str, args)), log=tmp_path / "health.log", home=tmp_path
            )
            ours = [sys.executable, "-m", "engine.cli", "health", "--initial-peers", *peers, "--json"]
            (model,) = json.loads(_run_text(ours, tmp_path))
            table = [
                sys.executable,
                "-m",
                "engine.cli",
                "health",
                "--initial-peers",
                *peers,
                "--model",
                PREFIX,
            ]
            text = _run_text(table, tmp_path)

    # Petals' own view parses both servers' records.
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

    # Ours shows every server, the Petals one with its version, and the model as complete.
    assert model["dht_prefix"] == PREFIX and model["num_blocks"] == 4 and model["complete"]
    assert model["coverage"] == [1, 1, 1, 1]
    by_span = {(s["start_block"], s["end_block"]): s for s in model["servers"]}
    assert set(by_span) == {(0, 2), (2, 4)}
    petals, pollinate = by_span[(2, 4)], by_span[(0, 2)]
    assert petals["version"] == "2.2.0.post1" and pollinate["version"] != petals["version"]
    for server in (petals, pollinate):
        assert server["state"] == "online" and server["throughput"] > 0 and server["cache_tokens_left"] > 0
        assert server["quant_type"] == "none" and server["torch_dtype"] == "float32"
        assert server["reachability"] == "direct"
    assert f"{PREFIX}): 4/4 blocks covered, complete, 2 servers" in text
    assert "2.2.0.post1" in text and petals["peer_id"][-8:] in text and pollinate["peer_id"][-8:] in text


def _wait_for_line(log, line: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if line in log.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


def _run_text(args, home) -> str:
    done = subprocess.run(
        list(map(str, args)), capture_output=True, text=True, env=base_env(home), cwd=REPO_ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
