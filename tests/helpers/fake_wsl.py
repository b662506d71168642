"""A fake `wsl.exe` for tests on Linux: runs `--exec` commands as local child processes, like WSL would.

`install(bin_dir, ...)` writes an executable `wsl.exe` into bin_dir (put it first on PATH) and returns a
FakeWsl whose JSON state file says what it simulates: WSL missing ("not-installed"), the old inbox WSL
without `--version` ("inbox"), a version, and the distributions with their state ("Running"/"Stopped")
and WSL version. Like the real one:
- its own messages are UTF-16LE unless WSL_UTF8=1 (and `honours_utf8` is true);
- a command inside a distribution sees only the distribution's environment plus the variables WSLENV
  names (not the caller's whole environment), and runs as a child, so the Linux pid is not wsl.exe's;
- `-d NAME` starts a stopped distribution; an unknown NAME fails;
- `--import`, `--unregister`, `--terminate`, `--shutdown` change the distributions.
Every call is appended to calls.jsonl beside the state file.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

NO_DISTRIBUTION = (
    "There is no distribution with the supplied name.\nError code: Wsl/Service/WSL_E_DISTRO_NOT_FOUND"
)
NOT_INSTALLED = (
    "The Windows Subsystem for Linux is not installed. You can install by running 'wsl.exe --install'."
)
INBOX_USAGE = (
    "Invalid command line argument: --version\nPlease use 'wsl.exe --help' to get a list of arguments."
)


class FakeWsl:
    """The state of a fake wsl.exe, and helpers to change it and read its call log."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.state_path = self.root / "state.json"
        self.calls_path = self.root / "calls.jsonl"

    def state(self) -> dict:
        return json.loads(self.state_path.read_text())

    def write(self, state: dict) -> None:
        """Replace the state atomically: a wsl.exe call that reads it meanwhile never sees half a file."""
        temporary = self.state_path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(state))
        os.replace(temporary, self.state_path)

    def update(self, **changes) -> None:
        with _locked(self.state_path):
            state = self.state()
            state.update(changes)
            self.write(state)

    def set_distribution(self, name: str, state: str = "Stopped", version: int = 2) -> None:
        with _locked(self.state_path):
            current = self.state()
            current["distributions"][name] = {"state": state, "version": version}
            self.write(current)

    def calls(self) -> list[list[str]]:
        if not self.calls_path.exists():
            return []
        return [json.loads(line) for line in self.calls_path.read_text().splitlines() if line]


def install(
    bin_dir: Path,
    *,
    version: str = "2.3.26.0",
    mode: str = "installed",
    distributions: dict | None = None,
    environment: dict[str, str] | None = None,
    honours_utf8: bool = True,
    delay_s: float = 0.0,
) -> FakeWsl:
    """Write bin_dir/wsl.exe and its state; `environment` is what a process inside the distribution sees."""
    bin_dir = Path(bin_dir)
    root = bin_dir / "fake-wsl"
    root.mkdir(parents=True, exist_ok=True)
    fake = FakeWsl(root)
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(root), "LANG": "C.UTF-8"}
    fake.state_path.write_text(
        json.dumps(
            {
                "mode": mode,
                "version": version,
                "honours_utf8": honours_utf8,
                "delay_s": delay_s,  # every call answers this late (a slow or just-booting WSL)
                "distributions": distributions if distributions is not None else {},
                "environment": {**base, **(environment or {})},
            }
        )
    )
    script = bin_dir / "wsl.exe"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        f"import fake_wsl\nsys.exit(fake_wsl.main(sys.argv[1:], {str(fake.state_path)!r}))\n"
    )
    script.chmod(0o755)
    return fake


@contextmanager
def _locked(path: Path):
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _say(text: str, state: dict, stream=None) -> None:
    """Print one of wsl.exe's own messages in its encoding."""
    stream = stream or sys.stdout
    data = text + "\n"
    utf8 = state.get("honours_utf8") and os.environ.get("WSL_UTF8") == "1"
    stream.buffer.write(data.encode("utf-8") if utf8 else data.encode("utf-16-le"))
    stream.flush()


def _list_verbose(state: dict) -> str:
    lines = ["  NAME                   STATE           VERSION"]
    for index, (name, info) in enumerate(state["distributions"].items()):
        mark = "*" if index == 0 else " "
        lines.append(f"{mark} {name:<22} {info['state']:<15} {info['version']}")
    return "\n".join(lines)


def _inside_environment(state: dict) -> dict[str, str]:
    environment = dict(state["environment"])
    for entry in os.environ.get("WSLENV", "").split(":"):
        name = entry.split("/")[0]
        if name and name in os.environ:
            environment[name] = os.environ[name]
    return environment


def main(argv: list[str], state_path: str) -> int:
    fake = FakeWsl(Path(state_path).parent)
    with open(fake.calls_path, "a") as log:
        log.write(json.dumps(argv) + "\n")
    state = fake.state()
    time.sleep(state.get("delay_s", 0.0))
    if state["mode"] == "not-installed":
        _say(NOT_INSTALLED, state)
        return 1
    if argv[:1] == ["--version"]:
        if state["mode"] == "inbox":
            _say(INBOX_USAGE, state)
            return 1
        _say(f"WSL version: {state['version']}\nKernel version: 5.15.153.1-2\nWSLg version: 1.0.65", state)
        return 0
    if argv[:2] in (["--list", "--verbose"], ["-l", "-v"]):
        if not state["distributions"]:
            _say("Windows Subsystem for Linux has no installed distributions.", state)
            return 1
        _say(_list_verbose(state), state)
        return 0
    if argv[:1] == ["--import"] and len(argv) >= 4:
        fake.set_distribution(argv[1], "Stopped", 2)
        return 0
    if argv[:1] in (["--unregister"], ["--terminate"]) and len(argv) >= 2:
        with _locked(fake.state_path):
            current = fake.state()
            if argv[1] not in current["distributions"]:
                _say(NO_DISTRIBUTION, state)
                return 1
            if argv[0] == "--unregister":
                del current["distributions"][argv[1]]
            else:
                current["distributions"][argv[1]]["state"] = "Stopped"
            fake.write(current)
        return 0
    if argv[:1] == ["--shutdown"]:
        with _locked(fake.state_path):
            current = fake.state()
            for info in current["distributions"].values():
                info["state"] = "Stopped"
            fake.write(current)
        return 0
    return _run_inside(fake, argv)


def _run_inside(fake: FakeWsl, argv: list[str]) -> int:
    """`-d NAME [-u USER] [--cd DIR] --exec ARGV...`: run ARGV as a child with the distribution's env."""
    state = fake.state()
    name, cwd, rest = None, None, list(argv)
    while rest and rest[0] != "--exec":
        option = rest.pop(0)
        if option in ("-d", "--distribution") and rest:
            name = rest.pop(0)
        elif option in ("-u", "--user") and rest:
            rest.pop(0)
        elif option == "--cd" and rest:
            cwd = rest.pop(0)
        else:
            _say(f"Invalid command line argument: {option}", state)
            return 1
    if not rest or len(rest) < 2:
        _say("Invalid command line: expected --exec COMMAND", state)
        return 1
    name = name or next(iter(state["distributions"]), None)
    if name not in state["distributions"]:
        _say(NO_DISTRIBUTION, state, sys.stderr)
        return 1
    fake.set_distribution(name, "Running", state["distributions"][name]["version"])
    try:
        child = subprocess.Popen(rest[1:], env=_inside_environment(state), cwd=cwd)
    except OSError as exc:
        print(f"<3>WSL (1) ERROR: CreateProcessParseCommon: {rest[1]}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        return child.wait()
    except KeyboardInterrupt:
        return child.wait()
