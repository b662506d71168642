"""First run on Windows: create the `Pollinate` WSL2 distribution with the engine, reporting progress.

The Windows installer puts a payload beside the app (`wsl/`: an Ubuntu base root file system, the engine's
set-up script and the Pollinate wheel). WslSetup imports the root file system as a distribution of its own
(`wsl --import`, so the user's distributions are untouched), runs the set-up script in it as root (a Python
venv, the CUDA build of torch, Pollinate), then restarts it so its default user applies. Each step runs as
a QProcess (the Qt thread never waits); the script's `POLLINATE-STEP i/n text` lines become progress.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from app import wsl
from app.qt import QObject, QProcess, QProcessEnvironment, Signal

STEP_LINE = re.compile(r"^POLLINATE-STEP (\d+)/(\d+) (.+)$")
ROOTFS = "rootfs.tar.gz"
SCRIPT = "setup-engine.sh"


@dataclass(frozen=True)
class SetupPayload:
    """What the installer ships for the distribution."""

    rootfs: Path
    script: Path
    wheel: Path


def parse_step(line: str) -> tuple[int, int, str] | None:
    """`POLLINATE-STEP 3/6 Installing PyTorch` -> (3, 6, "Installing PyTorch"); other lines -> None."""
    match = STEP_LINE.match(line.strip())
    return (int(match.group(1)), int(match.group(2)), match.group(3)) if match else None


def find_payload(folder: Path | None = None) -> SetupPayload | None:
    """The payload in `folder` (default: POLLINATE_WSL_PAYLOAD, else `wsl/` beside the frozen app)."""
    if folder is None:
        if os.environ.get("POLLINATE_WSL_PAYLOAD"):
            folder = Path(os.environ["POLLINATE_WSL_PAYLOAD"])
        elif getattr(sys, "frozen", False):
            folder = Path(sys.executable).resolve().parent / "wsl"
        else:
            return None
    wheels = sorted(Path(folder).glob("pollinate-*.whl"))
    rootfs, script = Path(folder) / ROOTFS, Path(folder) / SCRIPT
    if not (rootfs.exists() and script.exists() and wheels):
        return None
    return SetupPayload(rootfs, script, wheels[-1])


def inside_path(path: Path) -> str:
    """A Windows path as the distribution sees it (/mnt/c/...); a POSIX path as it is (tests)."""
    with contextlib.suppress(ValueError):
        return wsl.windows_to_wsl_path(str(path))
    return str(path)


def setup_commands(
    payload: SetupPayload, install_dir: Path, distribution: str = wsl.DISTRIBUTION, torch_index: str = ""
) -> list[tuple[str, list[str]]]:
    """(what the user reads, wsl.exe arguments) for each step."""
    script_args = [inside_path(payload.wheel), torch_index]
    return [
        (
            "Creating the Pollinate WSL distribution",
            ["--import", distribution, str(install_dir), str(payload.rootfs), "--version", "2"],
        ),
        (
            "Installing the engine in WSL",
            ["-d", distribution, "-u", "root", "--exec", "sh", inside_path(payload.script), *script_args],
        ),
        ("Restarting the distribution", ["--terminate", distribution]),
    ]


class WslSetup(QObject):
    """Runs the set-up steps one after another. Signals: progress(text), finished(ok, message)."""

    progress = Signal(str)
    finished = Signal(bool, str)

    def __init__(
        self,
        payload: SetupPayload,
        install_dir: Path,
        log_path: Path,
        *,
        wsl_exe: str = "wsl.exe",
        distribution: str = wsl.DISTRIBUTION,
        torch_index: str = "",
        parent: QObject | None = None,
    ):
        super().__init__(parent)
        self.install_dir = Path(install_dir)
        self.log_path = Path(log_path)
        self.wsl_exe = wsl_exe
        self.distribution = distribution
        self.steps = setup_commands(payload, self.install_dir, distribution, torch_index)
        self.running = False
        self._index = -1
        self._process: QProcess | None = None
        self._pending = ""

    def start(self) -> None:
        self.running = True
        self.install_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._next()

    def cancel(self) -> None:
        if self._process is not None and self._process.state() != QProcess.ProcessState.NotRunning:
            self._process.kill()
            self._process.waitForFinished(5000)
        self.running = False

    def _next(self) -> None:
        self._index += 1
        if self._index >= len(self.steps):
            self.running = False
            self.finished.emit(True, "The engine is set up in WSL.")
            return
        text, args = self.steps[self._index]
        self.progress.emit(f"{text}…")
        self._log(f"=== {text}: {self.wsl_exe} {' '.join(args)}\n")
        process = QProcess(self)
        environment = QProcessEnvironment.systemEnvironment()
        environment.insert("WSL_UTF8", "1")
        process.setProcessEnvironment(environment)
        process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        process.readyReadStandardOutput.connect(self._read)
        process.finished.connect(self._done)
        process.errorOccurred.connect(self._error)
        self._process = process
        process.start(self.wsl_exe, args)

    def _read(self) -> None:
        text = wsl.decode_output(bytes(self._process.readAllStandardOutput()))
        self._log(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            step = parse_step(line)
            if step:
                number, total, what = step
                self.progress.emit(f"Setting up the engine in WSL ({number}/{total}): {what}…")

    def _done(self, code: int, _status) -> None:
        if not self.running:
            return
        if code != 0:
            self._fail(f"{self.steps[self._index][0]} failed (exit code {code})")
            return
        self._next()

    def _error(self, error) -> None:
        if error == QProcess.ProcessError.FailedToStart and self.running:
            self._fail(f"could not run {self.wsl_exe}")

    def _fail(self, reason: str) -> None:
        self.running = False
        if self._index >= 1:  # a half-made distribution: remove it, so the next start sets it up again
            QProcess.startDetached(self.wsl_exe, ["--unregister", self.distribution])
        where = f"Details in {self.log_path}."
        self.finished.emit(False, f"Setting up the engine in WSL failed: {reason}. {where}")

    def _log(self, text: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as file:
            file.write(text)
