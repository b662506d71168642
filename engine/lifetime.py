"""Nothing the engine starts outlives it: forked children stop on SIGTERM; a reaper cleans up after a kill.

hivemind forks its DHT processes and each starts a p2p daemon; torch may start its shared-memory manager.
A forked child inherits the engine's SIGTERM handler (which only sets a flag), so a group SIGTERM (`timeout`,
systemd, `docker stop`) left them running; `install_fork_hooks` gives forked children the default action
back. A `kill -9` of the engine runs no code of ours at all: a small reaper process (`python -m
engine.reaper`, in its own session so a group signal does not take it first) watches the engine, remembers
its descendants, and ends them when the engine is gone, whatever way it went.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys

logger = logging.getLogger(__name__)

_hooks_installed = False
_reaper: subprocess.Popen | None = None  # kept referenced: it must outlive our objects, not be collected


def _in_forked_child() -> None:
    # The parent's handlers are Python callables that set the parent's stop flag: meaningless here.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the child's main thread: nothing to reset
            signal.signal(signum, signal.SIG_DFL)


def install_fork_hooks() -> None:
    """Forked children (hivemind's DHT processes) die on SIGTERM instead of running our handler."""
    global _hooks_installed
    if not _hooks_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_in_forked_child)
        _hooks_installed = True


def start_reaper(grace_s: float = 1.0) -> subprocess.Popen | None:
    """Start the reaper that ends this process's descendants once this process is gone (None if it fails)."""
    global _reaper
    if getattr(sys, "frozen", False):  # a bundled executable has no `-m`: the bundle must provide its own
        logger.warning("no reaper in a frozen build: children may outlive a killed engine")
        return None
    command = [sys.executable, "-m", "engine.reaper", str(os.getpid()), "--grace", str(grace_s)]
    try:
        _reaper = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=None,  # its rare warnings go where ours go
            start_new_session=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        return _reaper
    except OSError as error:
        logger.warning("cannot start the reaper (children may outlive a killed engine): %s", error)
        return None


def guard_children() -> subprocess.Popen | None:
    """Both of the above; call once at the start of a long-running command, before anything forks."""
    install_fork_hooks()
    return start_reaper()
