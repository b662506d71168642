"""Pausing a block server: HOLD (keep the weights, stop accepting work) vs RELEASE (free everything).

For a ~75 MB llama-shaped checkpoint made locally (8 blocks, hidden 512) hosted on the CPU by an in-process
BlockHost on 127.0.0.1, measures over --repeats rounds, with one inference session open when the drain
starts (grace 0: it is ended at once, as after a pause's grace period):

- HOLD: drain time (announce OFFLINE, end the session), resume time (announce ONLINE), RSS change;
- RELEASE: drain time (plus freeing the weights), RSS given back, and the time to serve again (a new
  BlockHost: load the span, announce ONLINE).

The ratio "resume after RELEASE / resume after HOLD" is why short pauses hold and long ones release.

    python bench/drain.py [--repeats 3] [--layers 8] [--hidden 512]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def rss() -> int:
    import psutil

    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()

    import torch

    from engine.models.tiny import build_tiny_checkpoint
    from engine.server.block_host import BlockHost
    from engine.server.config import ServerConfig
    from engine.server.drain import DrainMode
    from engine.swarm.dht_node import start_dht
    from tests.helpers.servers import WireClient

    folder = Path(tempfile.mkdtemp(prefix="pollinate-drain-bench-"))
    path = build_tiny_checkpoint(folder / "model", "llama", num_layers=args.layers, hidden_size=args.hidden)
    boot = start_dht(None, host="127.0.0.1", new_swarm=True)
    peers = tuple(str(a) for a in boot.get_visible_maddrs())
    uids = " ".join(f"bench.{i}" for i in range(args.layers))
    config = ServerConfig(
        model=str(path),
        initial_peers=peers,
        host="127.0.0.1",
        device="cpu",
        throughput=1.0,
        start_block=0,
        end_block=args.layers,
        dht_prefix="bench",
    )

    def open_session(host):
        client = WireClient(list(host.info().multiaddrs))
        session = client.inference(uids, max_length=16)
        session.step(torch.randn(1, 4, args.hidden))  # touches every block's weights
        return client, session

    rows: dict[str, list[float]] = {
        k: [] for k in ("hold", "resume", "hold_rss", "release", "freed", "restart")
    }
    try:
        for _ in range(args.repeats):
            host = BlockHost(config)
            host.start()
            client, session = open_session(host)
            before = rss()
            report = host.drain(0.0, DrainMode.HOLD)
            rows["hold"].append(report.total_seconds)
            rows["hold_rss"].append((before - rss()) / 2**20)
            started = time.perf_counter()
            host.resume()
            rows["resume"].append(time.perf_counter() - started)
            session.close()
            client.close()
            client, session = open_session(host)
            before = rss()
            report = host.drain(0.0, DrainMode.RELEASE)
            session.close()
            client.close()
            rows["release"].append(report.total_seconds)
            del host
            rows["freed"].append((before - rss()) / 2**20)
            started = time.perf_counter()
            again = BlockHost(config)
            again.start()
            rows["restart"].append(time.perf_counter() - started)
            again.stop()
            del again
    finally:
        boot.shutdown()

    def cell(key: str, unit: str) -> str:
        values = rows[key]
        return f"{min(values):8.2f} {statistics.median(values):8.2f} {unit}"

    weights = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    print(f"\nDrain of a {args.layers}-block CPU span (~{weights:.0f} MB of weights), {args.repeats} rounds")
    print(f"{'':34} {'min':>8} {'median':>8}")
    print(f"{'HOLD: drain (1 session ended)':34} {cell('hold', 's')}")
    print(f"{'HOLD: resume (announce ONLINE)':34} {cell('resume', 's')}")
    print(f"{'HOLD: memory given back':34} {cell('hold_rss', 'MB')}")
    print(f"{'RELEASE: drain + free':34} {cell('release', 's')}")
    print(f"{'RELEASE: memory given back':34} {cell('freed', 'MB')}")
    print(f"{'RELEASE: serve again (load+announce)':34} {cell('restart', 's')}")
    ratio = statistics.median(rows["restart"]) / max(statistics.median(rows["resume"]), 1e-6)
    print(f"serving again after RELEASE takes {ratio:.0f}x as long as after HOLD")


if __name__ == "__main__":
    main()
