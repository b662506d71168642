"""WslBackend: the engine in a WSL2 distribution of its own (Windows), driven through wsl.exe.

How state and token cross the boundary: the app runs a few lines of Python *inside* the distribution
(`wsl.exe -d Pollinate --exec <venv python> -c ...`) that read engine-state.json with the engine's own
identity check and print it with the token as one JSON line. Not `\\\\wsl$` paths: those need the
distribution running and its 9P file server answering, their name changed (`\\\\wsl.localhost`), and the
token file's 0600 permission means nothing there. Not only the engine's stdout either: an engine kept
sharing in the background must be found again by the next app start. The same channel stops the engine
(signals sent inside, only to the process the state file proves is the engine) and checks the GPU.

The API itself is reached on 127.0.0.1: WSL2 forwards localhost ports to Windows. The engine is tied to the
app through wsl.exe's standard input (`--exit-on-stdin-eof`): when the app ends, for any reason, Windows
closes the pipe and the engine stops, which `--parent-pid` cannot do across the boundary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

from app import wsl
from app.engine_backend import EngineBackend, Preflight
from app.engine_process import EngineInfo

log = logging.getLogger(__name__)

# Runs inside the distribution with the engine's Python: argv = mode, data dir[, pid, process start time].
INSIDE_SCRIPT = """
import json, os, pathlib, signal, sys
mode, data_dir = sys.argv[1], pathlib.Path(sys.argv[2])
if mode == "state":
    from engine.service_cli import read_live_state
    state = read_live_state(data_dir)
    if state and state.get("token_file"):
        try:
            state["token"] = pathlib.Path(state["token_file"]).read_text().strip()
        except OSError:
            state["token"] = None
    print(json.dumps(state))
    sys.exit(0)
import psutil
try:
    engine = psutil.Process(int(sys.argv[3]))
    if abs(engine.create_time() - float(sys.argv[4])) >= 1.0:
        sys.exit(3)
    if mode == "term":
        engine.terminate()
    else:
        for process in engine.children(recursive=True) + [engine]:
            process.kill()
except psutil.Error:
    sys.exit(3)
"""


@dataclass(frozen=True)
class WslConfig:
    """Where the engine lives inside WSL; the defaults are what the Windows installer's setup creates."""

    distribution: str = wsl.DISTRIBUTION
    python: str = f"{wsl.ENGINE_VENV}/bin/python"
    data_dir: str = wsl.ENGINE_DATA_DIR
    user: str | None = None  # None: the distribution's default user (the setup makes it `pollinate`)
    wsl: str = "wsl.exe"


def _no_window() -> dict:
    """Popen options: no console window for wsl.exe on Windows; a new session elsewhere (tests)."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


class WslBackend(EngineBackend):
    """The engine in its own WSL2 distribution: started, read, watched and stopped through wsl.exe."""

    name = "wsl"
    poll_interval_ms = 1000  # each state read starts a small Python inside WSL
    blocking_calls = True  # each call starts wsl.exe (and may boot the distribution): off the Qt thread
    ALIVE_CHECK_S = 5.0  # how often an engine we attached to (not our child) is looked for inside WSL

    def __init__(self, config: WslConfig | None = None, call_timeout_s: float = 60.0):
        self.config = config or WslConfig()
        self.call_timeout_s = call_timeout_s
        self.gpus: list[wsl.Gpu] | None = None  # after preflight: what nvidia-smi inside WSL sees
        self.missing_distribution = False
        self._alive_checked = (0.0, None, True)  # (when, pid, answer) for an engine we did not start
        self._alive_refreshing = False

    # ---- wsl.exe calls

    def _wsl(self) -> str | None:
        return shutil.which(self.config.wsl)

    def _environment(self, inside: dict[str, str] | None = None) -> dict[str, str]:
        environment = dict(os.environ)
        environment["WSL_UTF8"] = "1"  # wsl.exe's own messages in UTF-8 (older versions: UTF-16, decoded)
        if inside:
            environment.update(inside)
            environment["WSLENV"] = wsl.wslenv(list(inside), os.environ.get("WSLENV", ""))
        return environment

    def run(self, args: list[str], timeout_s: float | None = None) -> tuple[int, str]:
        """Run wsl.exe with args; (exit code, decoded output). A missing wsl.exe or a timeout is code -1."""
        executable = self._wsl()
        if executable is None:
            return -1, ""
        try:
            done = subprocess.run(
                [executable, *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout_s or self.call_timeout_s,
                env=self._environment(),
                **_no_window(),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return -1, str(exc)
        return done.returncode, wsl.decode_output(done.stdout + done.stderr)

    def _inside(self, argv: list[str], timeout_s: float | None = None) -> tuple[int, str]:
        command = wsl.exec_command(self.config.wsl, self.config.distribution, argv, self.config.user)
        return self.run(command[1:], timeout_s)

    # ---- EngineBackend

    def preflight(self) -> Preflight:
        """WSL installed and new enough, our distribution there and on WSL 2, a GPU visible (else a note)."""
        self.missing_distribution = False
        if self._wsl() is None:
            return Preflight(False, wsl.INSTALL_STEP)
        code, text = self.run(["--version"], timeout_s=30)
        version = wsl.parse_version(text) if code == 0 else None
        if version is None and wsl.looks_not_installed(text):
            return Preflight(False, wsl.INSTALL_STEP)
        problem = wsl.version_problem(version)
        if problem:
            return Preflight(False, problem)
        code, text = self.run(["--list", "--verbose"], timeout_s=30)
        name = self.config.distribution
        listed = wsl.parse_distributions(text) if code == 0 else []
        ours = [d for d in listed if d.name.lower() == name.lower()]
        if not ours:
            self.missing_distribution = True
            return Preflight(False, wsl.SETUP_STEP.format(name=name))
        if ours[0].version != 2:
            return Preflight(False, wsl.WSL1_STEP.format(name=name))
        self.gpus = self.gpu_check()
        return Preflight(True, "" if self.gpus else wsl.NO_GPU_NOTE)

    def gpu_check(self) -> list[wsl.Gpu]:
        """The NVIDIA GPUs visible inside the distribution (starting it if it is stopped)."""
        code, text = self._inside(wsl.gpu_query())
        return wsl.parse_nvidia_smi(text) if code == 0 else []

    def engine_command(self, engine_args: list[str], *, tie_to_app: bool) -> list[str]:
        argv = [self.config.python, "-m", "engine.cli", *engine_args, "--data-dir", self.config.data_dir]
        if tie_to_app:
            argv.append("--exit-on-stdin-eof")
        return wsl.exec_command(self.config.wsl, self.config.distribution, argv, self.config.user)

    def spawn(self, command: list[str], env: dict[str, str], log_file: IO[bytes]) -> subprocess.Popen:
        inside = {name: value for name, value in env.items() if name != "POLLINATE_DATA_DIR"}  # --data-dir
        if inside.get("HF_HUB_CACHE"):
            with contextlib.suppress(ValueError):  # else it is already a path inside WSL
                inside["HF_HUB_CACHE"] = wsl.windows_to_wsl_path(inside["HF_HUB_CACHE"])
        # No keyring inside WSL that the app could read: the token goes to the 0600 file we read back.
        inside["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"
        executable = self._wsl() or command[0]
        tied = "--exit-on-stdin-eof" in command
        return subprocess.Popen(
            [executable, *command[1:]],
            # Tied: we hold the write end open and never write; when the app ends, the engine reads EOF.
            stdin=subprocess.PIPE if tied else subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=self._environment(inside),
            **_no_window(),
        )

    def read_state(self) -> EngineInfo | None:
        code, text = self._inside([self.config.python, "-c", INSIDE_SCRIPT, "state", self.config.data_dir])
        lines = [line for line in text.splitlines() if line.startswith(("{", "null"))]
        if code != 0 or not lines:
            if code != 0:
                log.info("cannot read the engine state inside WSL (exit %s): %s", code, text.strip()[-300:])
            return None
        try:
            raw = json.loads(lines[-1])
            if raw is None:
                return None
            return EngineInfo(
                int(raw["pid"]),
                str(raw["base_url"]),
                raw.get("token"),
                str(raw.get("version") or ""),
                float(raw.get("process_started") or 0.0),
                tuple(str(part) for part in raw.get("cmdline") or ()),
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable engine state from WSL: %s", exc)
            return None

    def alive(self, pid: int, process: subprocess.Popen | None, info: EngineInfo | None) -> bool:
        if process is not None:
            return process.poll() is None  # wsl.exe lives exactly as long as the engine inside
        # An engine we attached to: looked for inside WSL in a thread (never on the Qt thread); until the
        # first answer it counts as alive (it was found running a moment ago).
        checked_at, checked_pid, answer = self._alive_checked
        if time.monotonic() - checked_at >= self.ALIVE_CHECK_S and not self._alive_refreshing:
            self._alive_refreshing = True
            worker = threading.Thread(target=self._refresh_alive, args=(pid,), name="pollinate-wsl-alive")
            worker.daemon = True
            worker.start()
        return answer if checked_pid == pid else True

    def _refresh_alive(self, pid: int) -> None:
        try:
            state = self.read_state()
            self._alive_checked = (time.monotonic(), pid, state is not None and state.pid == pid)
        finally:
            self._alive_refreshing = False

    def launched(self, info: EngineInfo, process: subprocess.Popen) -> bool:
        # Linux pids differ from wsl.exe's; an engine that ran before we started would have been attached.
        return process.poll() is None

    def stop(
        self, pid: int, process: subprocess.Popen | None, info: EngineInfo | None, timeout_s: float
    ) -> None:
        self._alive_checked = (0.0, None, True)
        if process is not None and process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()  # end of file: a tied engine stops gracefully by itself
        if process is not None and (info is None or info.pid != pid):
            # Stopped while starting: pid is wsl.exe's; the state (if written yet) names the engine inside.
            found = self.read_state()
            if found is not None:
                info, pid = found, found.pid
        started = info.process_started if info is not None and info.pid == pid else None
        if started is not None:
            self._signal(pid, started, "term")
        if self._wait_gone(pid, process, timeout_s):
            return
        if started is not None:
            self._signal(pid, started, "kill")  # the engine and its helpers (p2pd)
        if process is not None:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)

    def _signal(self, pid: int, started: float, mode: str) -> None:
        argv = [self.config.python, "-c", INSIDE_SCRIPT, mode, self.config.data_dir, str(pid), repr(started)]
        code, text = self._inside(argv, timeout_s=30)
        if code not in (0, 3):
            log.warning("could not signal the engine inside WSL (exit %s): %s", code, text.strip()[-300:])

    def _wait_gone(self, pid: int, process: subprocess.Popen | None, timeout_s: float) -> bool:
        if process is not None:
            try:
                process.wait(timeout=timeout_s)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.read_state()
            if state is None or state.pid != pid:
                return True
            time.sleep(0.5)
        return False
