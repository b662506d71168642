"""`pollinate-engine serve` (host blocks of a model) and `pollinate-engine dht` (run a bootstrap peer).

Both print "peer_id: ..." and "multiaddr: ..." lines and a line starting with "ready" once they serve, then
run until SIGINT/SIGTERM and stop gracefully (a server announces OFFLINE first).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from engine.server.config import (
    COMPRESSION_CHOICES,
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    QUANT_CHOICES,
    ServerConfig,
)


def _parse_blocks(text: str) -> tuple[int, int] | None:
    if text == "auto":
        return None
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--blocks takes START:END (e.g. 0:8) or auto, got {text!r}"
        ) from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {text}: need 0 <= START < END")
    return start, end


def add_commands(subparsers) -> None:
    """Add the `serve` and `dht` commands to an argparse subparsers object."""
    serve = subparsers.add_parser("serve", help="host transformer blocks of a model for the swarm")
    serve.add_argument("model", help="Hugging Face hub id or local checkpoint folder")
    span = serve.add_mutually_exclusive_group()
    span.add_argument("--blocks", type=_parse_blocks, default=None, help="START:END, or auto (default)")
    span.add_argument("--num-blocks", type=int, default=None, help="host N blocks where the swarm needs them")
    serve.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of peers in the swarm")
    serve.add_argument("--new-swarm", action="store_true", help="start a new swarm instead of joining one")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=0, help="TCP port to listen on (default: any free port)")
    serve.add_argument("--announce-maddrs", nargs="*", default=[], help="public multiaddrs to announce")
    serve.add_argument("--quant", choices=QUANT_CHOICES, default="auto")
    serve.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    serve.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    serve.add_argument("--dht-prefix", default=None, help="override the model's DHT prefix")
    serve.add_argument("--throughput", type=float, default=None, help="announce this instead of measuring")
    serve.add_argument("--public-name", default=None, help="a name other peers see")
    serve.add_argument("--cache-bytes", type=int, default=None, help="KV-cache budget in bytes")
    serve.add_argument("--inference-max-length", type=int, default=2048)
    serve.add_argument("--max-alloc-timeout", type=float, default=600.0)
    serve.add_argument(
        "--max-request-tokens", type=int, default=8192, help="tokens (batch x length) per forward/backward"
    )
    serve.add_argument("--max-request-bytes", type=int, default=256 * 1024**2, help="bytes per request")
    serve.add_argument(
        "--forward-chunk-tokens", type=int, default=512, help="tokens per compute task of a long forward"
    )
    serve.add_argument("--update-period", type=float, default=60.0, help="seconds between DHT announcements")
    serve.add_argument("--compression", choices=COMPRESSION_CHOICES, default="none")
    serve.add_argument(
        "--rebalance-period",
        type=float,
        default=120.0,
        help="with --blocks auto or --num-blocks: mean seconds between checks whether to move to blocks the "
        "swarm needs more (jittered; 0 = never move)",
    )
    serve.add_argument(
        "--balance-quality",
        type=float,
        default=0.75,
        help="move when the swarm's weakest block would get faster by more than 1/this (Petals' rule)",
    )
    serve.add_argument(
        "--move-grace",
        type=float,
        default=10.0,
        help="when moving: seconds open sessions may finish before they are ended (their clients fail over)",
    )
    serve.set_defaults(handler=run_serve)

    dht = subparsers.add_parser("dht", help="run a DHT bootstrap peer for a swarm of your own")
    dht.add_argument("--initial-peers", nargs="*", default=[], help="join these peers (default: new swarm)")
    dht.add_argument("--host", default="0.0.0.0")
    dht.add_argument("--port", type=int, default=0)
    dht.set_defaults(handler=run_dht)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig a parsed `serve` command line describes."""
    start, end = args.blocks if args.blocks is not None else (None, None)
    return ServerConfig(
        model=args.model,
        start_block=start,
        end_block=end,
        num_blocks=args.num_blocks,
        dht_prefix=args.dht_prefix,
        initial_peers=tuple(args.initial_peers),
        new_swarm=args.new_swarm,
        host=args.host,
        port=args.port,
        announce_maddrs=tuple(args.announce_maddrs),
        quant=args.quant,
        dtype=args.dtype,
        device=args.device,
        cache_bytes=args.cache_bytes,
        inference_max_length=args.inference_max_length,
        max_alloc_timeout=args.max_alloc_timeout,
        max_request_tokens=args.max_request_tokens,
        max_request_bytes=args.max_request_bytes,
        forward_chunk_tokens=args.forward_chunk_tokens,
        update_period=args.update_period,
        throughput=args.throughput,
        public_name=args.public_name,
        compression=args.compression,
    )


def _catch_stop_signals() -> threading.Event:
    """SIGINT/SIGTERM set the returned event. Call it before printing "ready": a script that stops us as soon
    as it reads that line must find the handler in place (else the signal killed us without going OFFLINE)."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _wait_for(stop: threading.Event) -> None:
    while not stop.wait(1.0):
        pass


def _say(line: str) -> None:
    """Print a line that scripts parse in one write: the server's helpers log to the same pipe, and print()
    writes the text and its newline separately, so a log line could land inside it."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _print_address(peer_id: str, multiaddrs) -> None:
    _say(f"peer_id: {peer_id}")
    for address in multiaddrs:
        _say(f"multiaddr: {address}")


def run_serve(args: argparse.Namespace) -> int:
    """Host blocks until SIGINT/SIGTERM; returns the exit code."""
    from engine.lifetime import guard_children
    from engine.server.block_host import BlockHost

    config = config_from_args(args)
    guard_children()  # no DHT process or p2p daemon outlives this server, even after a kill -9
    period = getattr(args, "rebalance_period", 0.0)
    if config.fixed_span is None and period > 0:
        from engine.server.rebalancer import Rebalancer

        # The span was chosen for the swarm as it is now: move when it changes (servers join and leave).
        host = Rebalancer(
            config, period=period, balance_quality=args.balance_quality, grace_seconds=args.move_grace
        )
    else:
        host = BlockHost(config)
    try:
        host.start()
    except Exception as error:
        print(f"error: could not start the block server: {error}", file=sys.stderr, flush=True)
        return 1
    try:
        stop = _catch_stop_signals()
        info = host.info()
        _print_address(info.peer_id, info.multiaddrs)
        _say(
            f"ready: serving blocks {info.start_block}:{info.end_block} of {info.total_blocks} "
            f"(dht_prefix {info.dht_prefix}, {info.device}, {info.dtype}, quant {info.quant})"
        )
        _wait_for(stop)
    finally:
        print("stopping: announcing OFFLINE", flush=True)
        host.stop()
    return 0


def run_dht(args: argparse.Namespace) -> int:
    """Run a DHT peer until SIGINT/SIGTERM."""
    from engine.lifetime import guard_children
    from engine.swarm.dht_node import start_dht

    guard_children()
    dht = start_dht(args.initial_peers, host=args.host, port=args.port, new_swarm=not args.initial_peers)
    try:
        stop = _catch_stop_signals()
        _print_address(dht.peer_id.to_base58(), [str(a) for a in dht.get_visible_maddrs()])
        _say("ready: DHT peer running")
        _wait_for(stop)
    finally:
        dht.shutdown()
    return 0


def configure_logging(verbose: bool = False) -> None:
    """Log lines to stderr, INFO by default (hivemind keeps its own handler)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
