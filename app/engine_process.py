"""EngineProcess: starts the engine service, finds its port and token, watches it, restarts it with backoff.

Where the engine runs is a backend (app/engine_backend.py). LocalBackend, here, runs it as a child process in
its own session, its output appended to a log file, so that "keep sharing in the background" can outlive the
app. Unless that was chosen, it gets `--parent-pid` and exits when the app dies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from app import paths
from app.api_client import ApiClient, EngineEndpoint
from app.engine_backend import EngineBackend, Preflight
from app.qt import QObject, QTimer, Signal
from contract import KEYRING_SERVICE, KEYRING_TOKEN_USER, STATE_FILE

log = logging.getLogger(__name__)

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
MAX_FAST_FAILURES = 6
HEALTHY_RUN_RESETS_S = 60.0

NO_ENGINE_STEP = (
    "The engine is not installed beside the app (no engine-venv folder). Run the Pollinate installer again; "
    "or set POLLINATE_ENGINE_PYTHON to a Python that has Pollinate installed."
)

# EngineProcess.state values
STOPPED, STARTING, RUNNING, RESTARTING, FAILED = "stopped", "starting", "running", "restarting", "failed"


@dataclass(frozen=True)
class EngineInfo:
    """What engine-state.json says."""

    pid: int
    base_url: str
    token: str | None
    version: str = ""
    process_started: float = 0.0  # with the command line: proves the pid is still the engine's
    cmdline: tuple[str, ...] = ()


def read_state_file(data_dir: Path) -> EngineInfo | None:
    """Parse engine-state.json and resolve the token; None when missing, unreadable or its process is gone.

    "Gone" includes a pid that another process has taken since (crash, power loss): the state file's start
    time and command line must match the process too.
    """
    try:
        raw = json.loads((Path(data_dir) / STATE_FILE).read_text(encoding="utf-8"))
        pid = int(raw["pid"])
        base_url = str(raw.get("base_url") or f"http://127.0.0.1:{int(raw['port'])}")
        started = float(raw["process_started"])
        cmdline = tuple(str(part) for part in raw["cmdline"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    info = EngineInfo(pid, base_url, None, str(raw.get("version") or ""), started, cmdline)
    if not is_engine_process(info):
        return None
    return dataclasses.replace(info, token=read_token(raw))


def is_engine_process(info: EngineInfo) -> bool:
    """Whether info's pid is still the engine it names: alive, same start time, same command line."""
    try:
        process = psutil.Process(info.pid)
        with process.oneshot():
            return (
                process.status() != psutil.STATUS_ZOMBIE
                and abs(process.create_time() - info.process_started) < 1.0
                and tuple(process.cmdline()) == info.cmdline
            )
    except psutil.Error:
        return False


def read_token(raw: dict) -> str | None:
    """The API token named by the state file: a 0600 file, or the OS keyring."""
    if raw.get("token_source") == "file" and raw.get("token_file"):
        try:
            return Path(raw["token_file"]).read_text(encoding="utf-8").strip() or None
        except OSError:
            return None
    if raw.get("token_source") == "keyring":
        try:
            import keyring

            return keyring.get_password(KEYRING_SERVICE, KEYRING_TOKEN_USER)
        except Exception as exc:
            log.warning("cannot read the engine token from the keyring: %s", exc)
    return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def engine_args(
    swarm: str, initial_peers: tuple[str, ...] = (), extra_args: tuple[str, ...] = ()
) -> list[str]:
    """The arguments of `engine.cli` that start the engine service (any backend)."""
    args = ["run", "--port", "0", "--swarm", swarm]
    if initial_peers:
        args += ["--initial-peers", *initial_peers]
    return args + list(extra_args)


def engine_command(
    swarm: str,
    initial_peers: tuple[str, ...] = (),
    *,
    parent_pid: int | None = None,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    """The command line that starts the engine service as a local process."""
    command = [sys.executable, "-m", "engine.cli", *engine_args(swarm, initial_peers)]
    if parent_pid is not None:
        command += ["--parent-pid", str(parent_pid)]
    return command + list(extra_args)


def log_tail(path: Path, lines: int = 12, start: int = 0) -> str:
    """The last `lines` lines of the log at `path`, reading nothing before byte `start` (an earlier run's)."""
    try:
        with open(path, "rb") as file:
            file.seek(max(start, os.path.getsize(path) - 16_384))
            text = file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


# Lines that are no reason to stop: Python warnings, and log records below ERROR.
_NOT_A_REASON = re.compile(r"Warning\b|\bWARNING\b|\bINFO\b|\bDEBUG\b|warnings\.warn")
_ERROR_LINE = re.compile(r"\w*(Error|Exception)\b|\berror:|\bERROR\b|Traceback|Killed")


def crash_reason(tail: str, exit_code: int | None = None) -> str:
    """Why an engine stopped: the last error line of this run's output (never a warning), else how it ended.

    `tail` must hold only this run's output: an earlier run's error says nothing about this one.
    """
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.search(line) and not _NOT_A_REASON.search(line) and not line.startswith("Traceback"):
            return line[:300]
    if exit_code is not None and exit_code < 0:
        name = signal.Signals(-exit_code).name if -exit_code in signal.valid_signals() else str(-exit_code)
        return f"it was ended by signal {name}" + (" (killed)" if name == "SIGKILL" else "")
    return "no error in its output"


class LocalBackend(EngineBackend):
    """The engine as a child process of the app on this machine (Linux, macOS)."""

    name = "local"

    def __init__(self, data_dir: Path, python: Path | None = None):
        self.data_dir = Path(data_dir)
        self.python = python or paths.engine_python()

    def preflight(self) -> Preflight:
        if self.python is None:
            return Preflight(False, NO_ENGINE_STEP)
        return Preflight(True)

    def engine_command(self, engine_args: list[str], *, tie_to_app: bool) -> list[str]:
        command = [str(self.python or sys.executable), "-m", "engine.cli", *engine_args]
        return command + (["--parent-pid", str(os.getpid())] if tie_to_app else [])

    def spawn(self, command: list[str], env: dict[str, str], log_file: IO[bytes]) -> subprocess.Popen:
        environment = dict(os.environ)
        source_root = Path(__file__).resolve().parent.parent
        cwd = None
        if (source_root / "engine").is_dir():
            cwd = str(source_root)
            path = environment.get("PYTHONPATH", "")
            environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(source_root), path) if p)
        environment.update(env)
        # A new session: a Ctrl+C in the app's terminal does not reach the engine; it can outlive us.
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=environment,
            start_new_session=True,
        )

    def read_state(self) -> EngineInfo | None:
        return read_state_file(self.data_dir)

    def alive(self, pid: int, process: subprocess.Popen | None, info: EngineInfo | None) -> bool:
        if process is not None and process.pid == pid:
            return process.poll() is None  # also reaps our child, so it leaves no zombie
        if info is None or info.pid != pid:
            return pid_alive(pid)
        return is_engine_process(info)

    def launched(self, info: EngineInfo, process: subprocess.Popen) -> bool:
        return info.pid == process.pid

    def stop(
        self, pid: int, process: subprocess.Popen | None, info: EngineInfo | None, timeout_s: float
    ) -> None:
        target = self._signal_target(pid, process, info)
        if target is not None:
            try:
                target.terminate()  # the engine stops gracefully: announces OFFLINE, ends its helpers
                _gone, alive = psutil.wait_procs([target], timeout=timeout_s)
                if alive:
                    self._kill_group(pid, owned=process is not None)
                    psutil.wait_procs(alive, timeout=3)
            except psutil.Error:
                pass
        if process is not None:
            process.poll()

    @staticmethod
    def _signal_target(
        pid: int, process: subprocess.Popen | None, info: EngineInfo | None
    ) -> psutil.Process | None:
        """The engine process to stop, only if it is provably ours: never a process that took its pid."""
        try:
            if process is not None and process.pid == pid:
                # Our child, not yet reaped: its pid cannot have been given to another process.
                return psutil.Process(pid) if process.poll() is None else None
            if info is not None and info.pid == pid and is_engine_process(info):
                return psutil.Process(pid)  # psutil checks the start time again before each signal
        except psutil.Error:
            pass
        return None

    @staticmethod
    def _kill_group(pid: int, owned: bool) -> None:
        """SIGKILL the engine and its helper processes (p2pd); ours runs in its own process group."""
        try:
            if owned and hasattr(os, "killpg") and os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                psutil.Process(pid).kill()
        except (OSError, psutil.Error):
            pass


class EngineProcess(QObject):
    """Lifecycle of the engine service: start, wait for health, watch, restart with backoff, stop.

    Signals: `state_changed(state, message)`, `endpoint_changed(EngineEndpoint | None)` and `notice(text)`
    (something the user should know that does not stop the engine, e.g. no GPU visible).
    With `manage=False` (--no-engine) it only attaches to a running engine, and waits for one.
    `backend` says where the engine runs (default: a local process).
    """

    state_changed = Signal(str, str)
    endpoint_changed = Signal(object)
    notice = Signal(str)
    _call_done = Signal(object)  # (generation, then, result) from a backend call run off the Qt thread

    def __init__(
        self,
        data_dir: Path,
        command: Callable[[], list[str]],
        *,
        env_factory: Callable[[], dict[str, str]] | None = None,
        manage: bool = True,
        startup_timeout_s: float = 180.0,
        backoff_s: tuple[float, ...] = BACKOFF_S,
        backend: EngineBackend | None = None,
        parent: QObject | None = None,
    ):
        super().__init__(parent)
        self.data_dir = Path(data_dir)
        self.backend = backend or LocalBackend(self.data_dir)
        self.log_path = self.data_dir / "logs" / "engine.log"
        self._command = command
        self._env_factory = env_factory or dict
        self.manage = manage
        self.startup_timeout_s = startup_timeout_s
        self.backoff_s = backoff_s
        self.state = STOPPED
        self.message = ""
        self.pid: int | None = None
        self.owned = False  # whether we started this engine (and so stop it on quit)
        self.info: EngineInfo | None = None
        self.failures = 0
        self.restarts = 0
        self._started_at = 0.0
        self._log_offset = 0
        self._process: subprocess.Popen | None = None
        self._health = ApiClient(self)
        self._poll = QTimer(self)
        self._poll.timeout.connect(self._poll_startup)
        self._watch = QTimer(self)
        self._watch.setInterval(1000)
        self._watch.timeout.connect(self.check_alive)
        self._retry = QTimer(self)
        self._retry.setSingleShot(True)
        self._retry.timeout.connect(self._launch)
        self._generation = 0  # start/stop/detach begin a new one: results of older backend calls are dropped
        self._in_flight: int | None = None
        self._call_done.connect(self._finish_call)

    # ---- public

    def start(self) -> None:
        """Attach to a running engine if there is one, else start ours (unless manage is False)."""
        self._retry.stop()
        self.failures = 0
        self._generation += 1
        if self.backend.blocking_calls:
            self._set_state(STARTING, "Checking where the engine runs…")
        self._call(self._check_and_find, self._start_with)

    def _check_and_find(self) -> tuple[Preflight, EngineInfo | None]:
        try:
            check = self.backend.preflight()
            return check, (self.backend.read_state() if check.ready else None)
        except Exception as exc:  # a bug or an odd system: say it instead of hanging in "starting"
            log.exception("engine backend check failed")
            failed = Preflight(False, f"Could not check where the engine runs ({self.backend.name}): {exc}")
            return failed, None

    def _start_with(self, found: tuple[Preflight, EngineInfo | None]) -> None:
        check, info = found
        if not check.ready:
            self.pid = None
            self._set_state(FAILED, check.message)
            return
        if check.message:
            self.notice.emit(check.message)
        if info is not None:
            self.pid, self.owned, self.info = info.pid, False, info
            self._begin_wait("Connecting to the running engine…")
        elif not self.manage:
            self.pid = None
            self._begin_wait("Waiting for an engine to start (started with --no-engine)…")
        else:
            self._launch()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the engine if we own it (SIGTERM, then kill after timeout); blocks up to timeout_s."""
        self._generation += 1
        self._poll.stop()
        self._watch.stop()
        self._retry.stop()
        pid, self.pid = self.pid, None
        self._set_endpoint(None)
        if pid is not None and (self.owned or self.manage):
            info = self.info if self.manage else None
            self.backend.stop(pid, self._process if self.owned else None, info, timeout_s)
        self._set_state(STOPPED, "The engine is stopped.")

    def detach(self) -> None:
        """Leave the engine running (keep sharing in the background) and stop watching it."""
        self._generation += 1
        self._poll.stop()
        self._watch.stop()
        self._retry.stop()
        self.pid = None
        self._set_state(STOPPED, "The engine keeps running in the background.")

    def restart(self) -> None:
        """Stop and start again (after a settings change that needs it)."""
        self.stop()
        self.start()

    # ---- internals

    def _call(self, work: Callable[[], object], then: Callable[[object], None]) -> None:
        """Give work()'s result to then() on the Qt thread; work runs off it when the backend's calls block.

        A result that arrives after stop(), detach() or a new start() is dropped.
        """
        generation = self._generation
        if not self.backend.blocking_calls:
            then(work())
            return
        if self._in_flight == generation:
            return  # the previous call of this start has not answered yet
        self._in_flight = generation

        def run() -> None:
            try:
                result = work()
            except Exception:
                log.exception("the engine backend (%s) failed", self.backend.name)
                result = None
            self._call_done.emit((generation, then, result))

        threading.Thread(target=run, name="pollinate-engine-backend", daemon=True).start()

    def _finish_call(self, payload: tuple) -> None:
        generation, then, result = payload
        if self._in_flight == generation:
            self._in_flight = None
        if generation == self._generation:
            then(result)

    def _launch(self) -> None:
        if not self.manage:
            self.start()
            return
        command = self._command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as file:
            file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(command)}\n")
        self._log_offset = self.log_path.stat().st_size
        environment = {"POLLINATE_DATA_DIR": str(self.data_dir), **self._env_factory()}
        try:
            with open(self.log_path, "ab") as log_file:
                self._process = self.backend.spawn(command, environment, log_file)
        except OSError as exc:
            self._failed_attempt(f"could not run {command[0]}: {exc}")
            return
        pid = self._process.pid
        self.pid, self.owned, self.info = int(pid), True, None
        self._begin_wait("Starting the engine…" if not self.restarts else "Restarting the engine…")

    def _begin_wait(self, message: str) -> None:
        self._started_at = time.monotonic()
        self._set_state(STARTING if self.state != RESTARTING else RESTARTING, message)
        self._poll.start(self.backend.poll_interval_ms)

    def _poll_startup(self) -> None:
        if self.pid is not None and not self._alive():
            self._poll.stop()
            self._failed_attempt(self._exit_reason())
            return
        if time.monotonic() - self._started_at > self.startup_timeout_s:
            self._poll.stop()
            if self.manage:
                self.stop(timeout_s=5)
            self._failed_attempt(f"it did not become ready within {self.startup_timeout_s:.0f} s")
            return
        if self._health.endpoint is None:
            self._call(self.backend.read_state, self._state_read)

    def _state_read(self, info: EngineInfo | None) -> None:
        if info is None or self._health.endpoint is not None or self.state not in (STARTING, RESTARTING):
            return
        if self.owned and self._process is not None:
            if not self.backend.launched(info, self._process):
                return  # another engine's state (ours has not written its own yet)
        elif self.pid is not None and info.pid != self.pid:
            return
        self._health.set_endpoint(EngineEndpoint(info.base_url, None))
        call = self._health.get("/api/health")
        call.succeeded.connect(lambda _body, info=info: self._healthy(info))
        call.failed.connect(lambda _error: self._health.set_endpoint(None))

    def _healthy(self, info: EngineInfo) -> None:
        self._health.set_endpoint(None)
        if self.state not in (STARTING, RESTARTING):
            return
        self._poll.stop()
        self.pid, self.info = info.pid, info
        self._started_at = time.monotonic()
        was_restart = self.state == RESTARTING
        # Endpoint first: listeners of the state change call the API at once.
        self._set_endpoint(EngineEndpoint(info.base_url, info.token))
        self._set_state(RUNNING, "The engine restarted." if was_restart else "The engine is running.")
        self._watch.start()

    def check_alive(self) -> None:
        """Check at once whether a running engine still lives (the event stream dropping calls this)."""
        if self.state != RUNNING or self.pid is None or self._alive():
            return
        self._watch.stop()
        ran_for = time.monotonic() - self._started_at
        if ran_for > HEALTHY_RUN_RESETS_S:
            self.failures = 0
        self._set_endpoint(None)
        self._failed_attempt(self._exit_reason(), crashed=True)

    def _alive(self) -> bool:
        process = self._process if self.owned else None
        return self.pid is not None and self.backend.alive(self.pid, process, self.info)

    def _exit_reason(self) -> str:
        if not self.owned:
            return "the engine process exited"
        code = self._process.returncode if self._process is not None else None
        tail = log_tail(self.log_path, 40, start=self._log_offset) if self._log_tail_is_new() else ""
        reason = crash_reason(tail, code)
        return f"exit code {code}: {reason}" if code is not None else reason

    def _log_tail_is_new(self) -> bool:
        try:
            return self.log_path.stat().st_size > self._log_offset
        except OSError:
            return False

    def _failed_attempt(self, reason: str, crashed: bool = False) -> None:
        self.pid = None
        self.failures += 1
        if not self.manage:
            self._set_state(RESTARTING, f"The engine stopped ({reason}). Waiting for it to come back…")
            self._begin_wait(self.message)
            return
        if self.failures >= MAX_FAST_FAILURES:
            self._set_state(FAILED, f"The engine cannot start: {reason}. Details in {self.log_path}.")
            return
        delay = self.backoff_s[min(self.failures - 1, len(self.backoff_s) - 1)]
        what = "stopped unexpectedly" if crashed else "failed to start"
        self.restarts += 1
        self._set_state(RESTARTING, f"The engine {what} ({reason}). Restarting in {delay:g} s…")
        self._retry.start(int(delay * 1000))

    def _set_state(self, state: str, message: str) -> None:
        self.state, self.message = state, message
        self.state_changed.emit(state, message)

    def _set_endpoint(self, endpoint: EngineEndpoint | None) -> None:
        self.endpoint_changed.emit(endpoint)
