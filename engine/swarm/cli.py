"""`pollinate-engine health`: the swarm's models, their coverage and every server (like health.petals.dev)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from engine.swarm.health import ModelHealth


def add_commands(subparsers) -> None:
    """Add the `health` command to an argparse subparsers object."""
    health = subparsers.add_parser(
        "health",
        help="show the models a swarm serves, their block coverage and every server",
        description="Read the swarm's DHT and print, per model, which blocks are covered and by which "
        "servers (Pollinate and Petals servers alike).",
    )
    health.add_argument("--model", default=None, help="only this model (DHT prefix or owner/name)")
    health.add_argument(
        "--initial-peers",
        nargs="*",
        default=[],
        help="multiaddrs of peers in the swarm (default: public swarm)",
    )
    health.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="with --model: its block count, for a model the index lacks",
    )
    health.add_argument("--json", action="store_true", help="print JSON instead of a table")
    health.set_defaults(handler=run_health)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


SERVER_COLUMNS = (
    "name", "peer", "version", "state", "blocks", "throughput", "cache left", "quant", "dtype", "reach",
    "points",
)  # fmt: skip


def format_health(models: Sequence[ModelHealth]) -> str:
    """The health view as text: a line per model with its coverage, then its servers' table."""
    if not models:
        return "The swarm's model index is empty: no server announces a model."
    lines = []
    for model in models:
        state = "complete" if model.complete else f"missing blocks {_ranges(model.missing_blocks)}"
        name = model.repository or model.dht_prefix
        lines.append(
            f"{name} (dht_prefix {model.dht_prefix}): {model.covered_blocks}/{model.num_blocks} blocks "
            f"covered, {state}, {len(model.servers)} servers"
        )
        lines.append("  servers per block: " + " ".join(str(count) for count in model.coverage))
        if model.servers:
            rows = [SERVER_COLUMNS]
            rows += [_server_cells(server) for server in model.servers]
            lines.extend("  " + line for line in format_table(rows))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _server_cells(s) -> tuple[str, ...]:
    blocks = f"{s.start_block}:{s.end_block}"
    values = (s.public_name, s.peer_id[-8:], s.version, s.state, blocks, s.throughput, s.cache_tokens_left)
    return tuple(map(_cell, (*values, s.quant_type, s.torch_dtype, s.reachability, s.points)))


def _ranges(indices: Sequence[int]) -> str:
    parts, start = [], None
    for position, index in enumerate(indices):
        if start is None:
            start = index
        if position + 1 == len(indices) or indices[position + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)


def run_health(args: argparse.Namespace, out=None) -> int:
    """Handler of `health`; returns the exit code (1 when the swarm cannot be read)."""
    from engine.swarm.dht_node import SwarmConnectionError, start_dht
    from engine.swarm.discovery import fetch_snapshot, list_models
    from engine.swarm.health import read_swarm_health
    from engine.swarm.presets import PETALS_PUBLIC_INITIAL_PEERS
    from engine.swarm.records import ModelInfo

    out = out or sys.stdout
    if args.num_blocks is not None and (args.model is None or args.num_blocks < 1):
        print("error: --num-blocks needs --model and a positive count", file=sys.stderr)
        return 2
    peers = args.initial_peers or list(PETALS_PUBLIC_INITIAL_PEERS)
    try:
        dht = start_dht(peers, client_mode=True)
    except (ValueError, SwarmConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        models = list_models(dht)
        if args.num_blocks is not None:  # a model the index lacks (e.g. served only by older Petals)
            models = {**models, args.model: ModelInfo(num_blocks=args.num_blocks)}
        try:
            view = read_swarm_health(
                models, lambda prefix, n: fetch_snapshot(dht, prefix, n), only=args.model
            )
        except LookupError as exc:
            print(f"error: {exc} (pass --num-blocks N to read a model by its DHT prefix)", file=sys.stderr)
            return 1
    finally:
        dht.shutdown()
    if args.json:
        out.write(json.dumps([model.to_dict() for model in view], indent=1) + "\n")
    else:
        out.write(format_health(view))
    return 0
