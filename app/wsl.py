"""WSL2 facts as pure functions: wsl.exe command lines, output decoding and parsing, path translation, advice.

On Windows the engine runs in a WSL2 distribution of its own (named `Pollinate`), so the user's own
distributions are never touched. app/wsl_backend.py does the I/O; everything here is pure and unit-tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DISTRIBUTION = "Pollinate"
# `wsl --version` exists only in the Store build of WSL (the old inbox one lacks it, and with it reliable
# localhost forwarding and WSL_UTF8); 2.0 is what `wsl --update` gives any Windows 10 22H2 / 11 machine.
MIN_WSL_VERSION = (2, 0, 0)
ENGINE_USER = "pollinate"
ENGINE_VENV = "/opt/pollinate/venv"
ENGINE_DATA_DIR = f"/home/{ENGINE_USER}/.local/share/pollinate"

INSTALL_STEP = (
    "Pollinate's engine runs in WSL2, which is not installed. Open PowerShell as administrator, run "
    '"wsl --install --no-distribution", restart Windows, then start Pollinate again.'
)
UPDATE_STEP = (
    "Pollinate's engine needs WSL {need} or newer (this PC has {have}). Open PowerShell, run "
    '"wsl --update", then start Pollinate again.'
)
SETUP_STEP = (
    "Pollinate's engine is not set up in WSL yet (no distribution named {name}), and the files to set it up "
    "are missing. Run the Pollinate installer again, then start Pollinate."
)
WSL1_STEP = (
    "The {name} distribution runs on WSL 1, which cannot run the engine. Open PowerShell, run "
    '"wsl --set-version {name} 2", then start Pollinate again.'
)
NO_GPU_NOTE = (
    "No NVIDIA GPU is visible inside WSL: chat works, but sharing would run on the CPU. Install the current "
    "NVIDIA driver for Windows (it brings GPU support to WSL; install no driver inside WSL), then restart "
    "Pollinate."
)


@dataclass(frozen=True)
class Distribution:
    """One line of `wsl --list --verbose`."""

    name: str
    state: str  # "Running", "Stopped", "Installing", ... (localized on some systems)
    version: int  # 1 or 2
    default: bool = False


@dataclass(frozen=True)
class Gpu:
    """One GPU as nvidia-smi inside WSL reports it."""

    name: str
    memory_mib: int
    driver: str


def decode_output(raw: bytes) -> str:
    """wsl.exe's own messages are UTF-16LE unless WSL_UTF8=1 is honoured; commands run inside print UTF-8."""
    if raw.startswith(b"\xff\xfe"):
        return raw[2:].decode("utf-16-le", errors="replace")
    if len(raw) >= 2 and raw[1::2].count(0) > len(raw) // 4:
        return raw.decode("utf-16-le", errors="replace")
    return raw.decode("utf-8", errors="replace")


def parse_version(text: str) -> tuple[int, ...] | None:
    """The WSL version from `wsl --version` (first line, any language: "WSL version: 2.3.26.0"), or None."""
    for line in text.splitlines():
        if line.strip():
            match = re.search(r"(\d+)\.(\d+)\.(\d+)(?:\.(\d+))?", line)
            return tuple(int(part) for part in match.groups() if part is not None) if match else None
    return None


def format_version(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def parse_distributions(text: str) -> list[Distribution]:
    """Parse `wsl --list --verbose`: a header line, then `[*] NAME STATE VERSION` per distribution."""
    found = []
    for line in text.splitlines()[1:]:
        default = line.lstrip().startswith("*")
        parts = line.replace("*", " ", 1).split() if default else line.split()
        if len(parts) >= 3 and parts[-1].isdigit():
            found.append(Distribution(" ".join(parts[:-2]), parts[-2], int(parts[-1]), default))
    return found


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Parse `nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 3 and parts[1].isdigit():
            gpus.append(Gpu(parts[0], int(parts[1]), parts[2]))
    return gpus


def windows_to_wsl_path(path: str, mount_root: str = "/mnt/") -> str:
    """C:\\Users\\me -> /mnt/c/Users/me; \\\\wsl$\\Distro\\x or \\\\wsl.localhost\\Distro\\x -> /x."""
    normalized = path.replace("\\", "/")
    unc = re.match(r"^//(?:wsl\$|wsl\.localhost)/[^/]+(/.*)?$", normalized, re.IGNORECASE)
    if unc:
        return unc.group(1) or "/"
    drive = re.match(r"^([A-Za-z]):(/.*)?$", normalized)
    if not drive:
        raise ValueError(f"not an absolute Windows path: {path!r}")
    rest = (drive.group(2) or "/").rstrip("/")
    return f"{mount_root.rstrip('/')}/{drive.group(1).lower()}{rest}"


def wsl_to_windows_path(path: str, distribution: str = DISTRIBUTION, mount_root: str = "/mnt/") -> str:
    """/mnt/c/Users/me -> C:\\Users\\me; any other path -> \\\\wsl.localhost\\<distribution>\\path."""
    if not path.startswith("/"):
        raise ValueError(f"not an absolute Linux path: {path!r}")
    root = mount_root.rstrip("/") + "/"
    drive = re.match(rf"^{re.escape(root)}([a-z])(/.*)?$", path)
    if drive:
        return f"{drive.group(1).upper()}:" + (drive.group(2) or "/").replace("/", "\\")
    return f"\\\\wsl.localhost\\{distribution}" + path.replace("/", "\\")


def exec_command(wsl: str, distribution: str, argv: list[str], user: str | None = None) -> list[str]:
    """Run argv directly (no shell) in the distribution: `wsl.exe -d NAME [-u USER] --exec ARGV...`."""
    command = [wsl, "-d", distribution]
    if user:
        command += ["-u", user]
    return [*command, "--exec", *argv]


def wslenv(names: list[str], inherited: str = "") -> str:
    """The WSLENV value that passes these environment variables into WSL (keeping the ones already set)."""
    entries = [entry for entry in inherited.split(":") if entry]
    known = {entry.split("/")[0] for entry in entries}
    return ":".join(entries + [name for name in names if name not in known])


def gpu_query(nvidia_smi_dir: str = "/usr/lib/wsl/lib") -> list[str]:
    """argv that asks nvidia-smi for the GPUs; WSL puts the Windows driver's nvidia-smi in nvidia_smi_dir."""
    script = (
        f'PATH="$PATH:{nvidia_smi_dir}"; exec nvidia-smi '
        "--query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits"
    )
    return ["sh", "-c", script]


def version_problem(version: tuple[int, ...] | None, minimum: tuple[int, ...] = MIN_WSL_VERSION) -> str:
    """The step to take when WSL is too old ("" when it is new enough)."""
    if version is not None and version >= minimum:
        return ""
    have = format_version(version) if version else "the old built-in WSL"
    return UPDATE_STEP.format(need=format_version(minimum), have=have)


def looks_not_installed(text: str) -> bool:
    """Whether wsl.exe's output says WSL itself is missing (the Windows stub answers this way)."""
    lowered = text.lower()
    return "not installed" in lowered or "wsl --install" in lowered or "0x8007019e" in lowered
