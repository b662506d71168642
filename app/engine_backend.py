"""Where the engine runs: the interface EngineProcess drives (a local process, or WSL2 on Windows).

EngineProcess owns the lifecycle (start, health, watch, restart with backoff); a backend knows how to run
the engine's command line in its place, read engine-state.json and the token from there, tell whether the
engine still lives, and stop it. `app.engine_process.LocalBackend` runs it as a child process (Linux,
macOS); `app.wsl_backend.WslBackend` runs it in a WSL2 distribution of its own (Windows).
"""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from app.engine_process import EngineInfo


@dataclass(frozen=True)
class Preflight:
    """Whether the engine can start in this place, and what to tell the user.

    ready=False: it cannot start until the user takes the step in `message` (e.g. install WSL).
    ready=True with a message: it can start, but the user should know (e.g. no GPU visible: chat only).
    """

    ready: bool
    message: str = ""


class EngineBackend(ABC):
    """One place the engine can run. Methods are called on the Qt thread unless `blocking_calls` says."""

    name = "engine"
    poll_interval_ms = 200  # how often EngineProcess reads the state while the engine starts
    # preflight() and read_state() may take long (they start processes): EngineProcess runs them off the Qt
    # thread. The other methods are quick, or (stop) documented to block.
    blocking_calls = False

    def preflight(self) -> Preflight:
        """Check, before each start, that the engine can run here."""
        return Preflight(True)

    @abstractmethod
    def engine_command(self, engine_args: list[str], *, tie_to_app: bool) -> list[str]:
        """The full command line that runs `engine.cli` with these arguments in this place.

        tie_to_app: the engine must exit when the app ends (unless the user chose to keep sharing).
        """

    @abstractmethod
    def spawn(self, command: list[str], env: dict[str, str], log_file: IO[bytes]) -> subprocess.Popen:
        """Start the command in a new session, output to log_file; env: only the engine's own variables."""

    @abstractmethod
    def read_state(self) -> EngineInfo | None:
        """engine-state.json of a live engine, with its token; None when there is none (or it is stale)."""

    @abstractmethod
    def alive(self, pid: int, process: subprocess.Popen | None, info: EngineInfo | None) -> bool:
        """Whether the engine with this pid runs; process: what spawn returned, if ours; info: its state."""

    @abstractmethod
    def launched(self, info: EngineInfo, process: subprocess.Popen) -> bool:
        """Whether the engine named by `info` is the one `process` (from spawn) started."""

    @abstractmethod
    def stop(
        self, pid: int, process: subprocess.Popen | None, info: EngineInfo | None, timeout_s: float
    ) -> None:
        """Stop the engine gracefully (it announces OFFLINE, ends its helpers); force it after timeout_s.

        Only a process that is provably the engine (our child, or one matching `info`) is ever signalled.
        """


def default_backend(data_dir) -> EngineBackend:
    """WSL2 on Windows (hivemind's p2p daemon runs on Linux and macOS only), else a local child process.

    POLLINATE_ENGINE_BACKEND=local|wsl overrides the choice (wsl on Linux: tests with a fake wsl.exe).
    """
    import os
    import sys

    choice = os.environ.get("POLLINATE_ENGINE_BACKEND") or ("wsl" if sys.platform == "win32" else "local")
    if choice == "wsl":
        from app.wsl_backend import WslBackend

        return WslBackend()
    if choice != "local":
        raise ValueError(f"POLLINATE_ENGINE_BACKEND must be 'local' or 'wsl', not {choice!r}")
    from app.engine_process import LocalBackend

    return LocalBackend(data_dir)
