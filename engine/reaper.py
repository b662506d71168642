"""`python -m engine.reaper PID`: when process PID is gone, end the descendants it left behind.

Started by engine.lifetime in its own session. While the watched process runs, the reaper notes its
descendants (pid and start time) four times a second; once it is gone (exit, crash, kill -9, out-of-memory
kill) it sends SIGTERM to those still running, then SIGKILL after a grace period. A process is signalled
only if its pid still has the start time noted, so a pid reused by an unrelated process is never touched.
Only the standard library and psutil: it starts in a fraction of a second and holds little memory.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time

import psutil

POLL_S = 0.25


def descendants(process: psutil.Process) -> dict[int, float]:
    """{pid: start time} of every live descendant of `process`."""
    found = {}
    try:
        children = process.children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        with contextlib.suppress(psutil.Error):
            found[child.pid] = child.create_time()
    return found


def still_ours(known: dict[int, float]) -> list[psutil.Process]:
    """The processes of `known` that still run with the start time noted (not a reused pid)."""
    alive = []
    for pid, started in known.items():
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - started) < 0.01 and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            pass
    return alive


def reap(known: dict[int, float], grace_s: float) -> int:
    """SIGTERM the noted descendants (and theirs), SIGKILL what is left after grace_s; returns how many."""
    targets = still_ours(known)
    for process in list(targets):  # children started since the last look
        for pid, started in descendants(process).items():
            if pid not in known:
                known[pid] = started
                targets.extend(still_ours({pid: started}))
    for process in targets:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _gone, alive = psutil.wait_procs(targets, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=2.0)
    return len(targets)


def watch(pid: int, grace_s: float) -> int:
    """Watch `pid` until it ends, then reap what it left; returns the number of processes ended."""
    try:
        watched = psutil.Process(pid)
    except psutil.Error:
        return 0
    known: dict[int, float] = {}
    while True:
        try:
            running = watched.is_running() and watched.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            running = False
        if not running:
            break
        known.update(descendants(watched))
        known = {p: t for p, t in known.items() if psutil.pid_exists(p)}
        time.sleep(POLL_S)
    return reap(known, grace_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.reaper", description=__doc__.splitlines()[0])
    parser.add_argument("pid", type=int, help="the process to watch")
    parser.add_argument("--grace", type=float, default=2.0, help="seconds between SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    # Group signals aimed at the engine must not stop us before we did our job; we end on our own.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    ended = watch(args.pid, args.grace)
    if ended:
        print(f"pollinate reaper: ended {ended} process(es) left by {args.pid}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
