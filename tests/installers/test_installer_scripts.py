"""Installer scripts that cannot run on this machine are at least checked with the tools that run here:
makensis compiles the Windows installer (from a stand-in app folder), the shell scripts parse (and pass
shellcheck where it is installed). What only Windows or macOS can show is named in installers/README.md."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHELL_SCRIPTS = [
    ROOT / "installers" / "linux" / "install.sh",
    ROOT / "installers" / "linux" / "bundle-install.sh",
    ROOT / "installers" / "linux" / "make_bundle.sh",
    ROOT / "installers" / "windows" / "setup-engine.sh",
    ROOT / "installers" / "macos" / "build_app.sh",
    ROOT / "installers" / "macos" / "install-engine.sh",
]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.name)
def test_shell_scripts_parse_and_pass_shellcheck(script):
    shell = "sh" if script.read_text().startswith("#!/bin/sh") else "bash"
    subprocess.run([shell, "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


@pytest.mark.skipif(shutil.which("makensis") is None, reason="apt-get install nsis")
def test_windows_installer_compiles(tmp_path):
    dist = tmp_path / "dist"
    (dist / "_internal").mkdir(parents=True)
    (dist / "pollinate.exe").write_bytes(b"stand-in for the PyInstaller app")
    (dist / "_internal" / "python311.dll").write_bytes(b"stand-in")
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "rootfs.tar.gz").write_bytes(b"stand-in")
    (payload / "pollinate-0.1.0-py3-none-any.whl").write_bytes(b"stand-in")
    shutil.copy(ROOT / "installers" / "windows" / "setup-engine.sh", payload)
    shutil.copy(ROOT / "installers" / "engine_requirements.py", payload)
    out = tmp_path / "Pollinate-Setup.exe"
    result = subprocess.run(
        ["makensis", "-V2", "-WX", f"-DDIST={dist}", f"-DPAYLOAD={payload}", f"-DOUTFILE={out}",
         str(ROOT / "installers" / "windows" / "pollinate.nsi")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr  # -WX: any warning fails too
    assert out.read_bytes()[:2] == b"MZ"


def test_engine_requirements_leave_out_qt_and_extras(tmp_path):
    wheel = tmp_path / "pollinate-0.1.0-py3-none-any.whl"
    metadata = (
        "Metadata-Version: 2.1\nName: pollinate\nRequires-Dist: torch<2.15,>=2.3\n"
        "Requires-Dist: PySide6-Essentials<6.12,>=6.7\nRequires-Dist: bitsandbytes>=0.45\n"
        'Requires-Dist: hivemind==1.1.12\nRequires-Dist: pytest>=8; extra == "dev"\n'
    )
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pollinate-0.1.0.dist-info/METADATA", metadata)
    script = ROOT / "installers" / "engine_requirements.py"
    printed = subprocess.run(
        [sys.executable, str(script), str(wheel), "pyside6_essentials", "BitsAndBytes"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert printed == ["torch<2.15,>=2.3", "hivemind==1.1.12"]
