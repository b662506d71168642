"""`pollinate-engine run`: the long-lived engine service behind the desktop app (docs/API.md).

It serves the HTTP API on 127.0.0.1, writes `engine-state.json` to the data directory so the app can find
it, joins the swarm in the background, and runs until SIGINT/SIGTERM, then stops gracefully and removes
the state file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from contract import STATE_FILE

logger = logging.getLogger(__name__)

STATE_FILE_NAME = STATE_FILE
DEFAULT_PORT = 8765  # taken -> a free port is used instead (the state file says which)


def add_commands(subparsers) -> None:
    """Add the `run` command to an argparse subparsers object."""
    run = subparsers.add_parser("run", help="run the engine service: HTTP API, swarm client, block hosting")
    run.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"HTTP port on 127.0.0.1 (default {DEFAULT_PORT}, or a free one if taken; 0 = any free port)",
    )
    run.add_argument(
        "--swarm",
        choices=("local", "public", "private"),
        default="local",
        help="local: a new swarm on this machine with the demo model (default); public: the Petals swarm; "
        "private: your own swarm (join with --initial-peers or --invite; without them, start a new one)",
    )
    run.add_argument(
        "--demo-model",
        choices=("smollm2", "tiny"),
        default="smollm2",
        help="the local swarm's model: smollm2 (SmolLM2-135M-Instruct, a small real model, default) or tiny "
        "(random weights, instant, gibberish replies)",
    )
    run.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of peers in the swarm")
    run.add_argument(
        "--invite",
        default=None,
        help="join a private swarm with the invite its creator shared (implies private)",
    )
    run.add_argument("--model", default=None, help="default chat and hosting model (default: the demo model)")
    run.add_argument("--data-dir", type=Path, default=None, help="where state, token and demo model live")
    run.add_argument(
        "--grace-seconds", type=float, default=30.0, help="how long stopping waits for running sessions"
    )
    run.add_argument(
        "--rebalance-period",
        type=float,
        default=120.0,
        help="while hosting with blocks auto or a count: mean seconds between checks whether to move to "
        "blocks the swarm needs more or to resize for free memory (jittered; 0 = never on its own)",
    )
    run.add_argument(
        "--balance-quality",
        type=float,
        default=0.75,
        help="move when the swarm's weakest block would get faster by more than 1/this (Petals' rule)",
    )
    run.add_argument(
        "--move-grace",
        type=float,
        default=10.0,
        help="when the hosted span moves: seconds open sessions may finish (then their clients fail over)",
    )
    run.add_argument(
        "--no-speculation",
        action="store_true",
        help="decode one token per trip through the swarm (no speculative decoding)",
    )
    run.add_argument(
        "--draft-blocks",
        type=int,
        default=0,
        help="draft with the model's own first N blocks run here (early exit; at most 256 MiB of them); "
        "0: prompt lookup",
    )
    run.add_argument(
        "--feature-drafter",
        default="auto",
        metavar="auto|off|PATH",
        help="speculate with a trained feature drafter (EAGLE-style): auto (default) uses the one shipped "
        "for the served model when there is one; PATH: a drafter folder (drafter.json + weights); off never",
    )
    run.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit (gracefully) when the process with this id ends (the desktop app passes its own)",
    )
    run.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="exit (gracefully) when standard input closes: the app on Windows holds it open through "
        "wsl.exe, where --parent-pid cannot see its process",
    )
    run.set_defaults(handler=run_service)


def state_file_path(data_dir: Path) -> Path:
    return Path(data_dir) / STATE_FILE_NAME


def process_identity(pid: int | None = None) -> dict:
    """What proves a process is this engine beyond its pid: its start time and command line."""
    import psutil

    process = psutil.Process(pid)
    return {"pid": process.pid, "process_started": process.create_time(), "cmdline": process.cmdline()}


def is_same_process(state: dict) -> bool:
    """Whether the process the state names still runs: same pid, same start time, same command line.

    A pid alone is not proof: after a crash or power loss another process may have taken it.
    """
    import psutil

    try:
        pid, started, cmdline = int(state["pid"]), float(state["process_started"]), state["cmdline"]
        process = psutil.Process(pid)
        with process.oneshot():
            return (
                pid != os.getpid()
                and abs(process.create_time() - started) < 1.0
                and process.cmdline() == cmdline
                and process.status() != psutil.STATUS_ZOMBIE
            )
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def read_live_state(data_dir: Path) -> dict | None:
    """The state of an engine that runs now for `data_dir`, or None (no file, or its process is gone)."""
    try:
        state = json.loads(state_file_path(data_dir).read_text())
        return state if isinstance(state, dict) and is_same_process(state) else None
    except (OSError, ValueError):
        return None


def _read_state_file(path: Path) -> dict | None:
    """The state file's content; None if there is none; ValueError (and the like) if it is damaged."""
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    if not isinstance(state, dict):
        raise ValueError("not a JSON object")
    return state


def write_state(data_dir: Path, state: dict) -> Path:
    """Write engine-state.json atomically (readers never see half a file)."""
    path = state_file_path(data_dir)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(state, indent=1))
    os.replace(temporary, path)
    return path


def remove_state(data_dir: Path) -> None:
    """Remove the state file if it is ours (another engine may have replaced it)."""
    path = state_file_path(data_dir)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _parent_gone(pid: int | None) -> bool:
    """Whether the parent we were started for (`--parent-pid`) has ended (a zombie counts as ended)."""
    if pid is None:
        return False
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:  # NoSuchProcess, or gone while we looked
        return True


def _watch_stdin(stop: threading.Event, closed: threading.Event) -> None:
    """Set `closed` (and `stop`) once standard input reaches end of file (the app holding it ended)."""

    def read() -> None:
        # os.read on the descriptor, not sys.stdin: a thread blocked inside sys.stdin holds its lock, and a
        # forked child (multiprocessing closes sys.stdin at start) would wait for that lock forever.
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        closed.set()
        stop.set()

    threading.Thread(target=read, name="pollinate-stdin", daemon=True).start()


def _start_api(app, port: int | None):
    from engine.api.server import ApiServer

    if port is not None:
        return ApiServer(app, port).start()
    try:
        return ApiServer(app, DEFAULT_PORT).start()
    except OSError:
        logger.info("port %d is taken; using a free port", DEFAULT_PORT)
        return ApiServer(app, 0).start()


def run_service(args: argparse.Namespace) -> int:
    """Run the engine until SIGINT/SIGTERM; returns the exit code."""
    from contract.stores import open_store
    from engine import paths
    from engine.api.app import create_app, end_open_streams
    from engine.api.auth import load_or_create_token
    from engine.lifetime import guard_children
    from engine.service import EngineService, ServiceConfig

    data_dir = Path(args.data_dir) if args.data_dir else paths.data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    # A damaged state file (a folder, garbage) would stop us writing ours: set it aside first.
    open_store(state_file_path(data_dir), _read_state_file, store="engine state file", notices=data_dir)
    running = read_live_state(data_dir)
    if running:
        print(
            f"error: an engine already runs for {data_dir} (pid {running['pid']}, {running.get('base_url')})"
        )
        return 1
    guard_children()  # before anything forks: no helper outlives the engine, however it ends
    try:
        swarm, peers = args.swarm, tuple(args.initial_peers)
        if getattr(args, "invite", None):
            from contract.invites import parse_invite

            swarm, peers = "private", (*peers, *parse_invite(args.invite))
        config = ServiceConfig(
            data_dir=data_dir,
            swarm=swarm,
            initial_peers=peers,
            default_model=args.model,
            demo_model=args.demo_model,
            grace_seconds=args.grace_seconds,
            speculation=not args.no_speculation,
            rebalance_period=args.rebalance_period,
            balance_quality=args.balance_quality,
            move_grace_seconds=args.move_grace,
            draft_blocks=args.draft_blocks,
            feature_drafter=args.feature_drafter,
        )
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    token = load_or_create_token(data_dir)
    service = EngineService(config)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    app = create_app(service, token.value)
    server = _start_api(app, args.port)
    state = {
        **process_identity(),
        "port": server.port,
        "base_url": server.base_url,
        "token_source": token.source,
        "token_file": str(token.file) if token.file else None,
        "version": service.version,
        "started_at": time.time(),
    }
    write_state(data_dir, state)
    print(f"engine API on {server.base_url} (state file {state_file_path(data_dir)})", flush=True)
    parent_pid = getattr(args, "parent_pid", None)
    stdin_closed = threading.Event()
    if getattr(args, "exit_on_stdin_eof", False):
        _watch_stdin(stop, stdin_closed)
    try:
        service.start()
        while not stop.wait(1.0):
            if not server.running:
                logger.error("the API server stopped unexpectedly")
                return 1
            if _parent_gone(parent_pid):
                logger.info("the parent process %d ended; stopping", parent_pid)
                break
        if stdin_closed.is_set():
            logger.info("standard input closed (the app ended); stopping")
    finally:
        print("stopping the engine", flush=True)
        remove_state(data_dir)
        # The API server and the service (DHT peers, servers) stop in parallel.
        closer = threading.Thread(target=service.close, name="pollinate-close")
        closer.start()
        end_open_streams(app)  # event streams end now; chats in progress get an error event and [DONE]
        server.stop()
        closer.join()
    return 0
