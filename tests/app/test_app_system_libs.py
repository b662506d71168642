"""./dev.sh app names Qt's missing system libraries and the command that installs them (issue 11)."""

from __future__ import annotations

import os

from app import system_libs


def _tool(folder, name, output):
    path = folder / name
    path.write_text(f"#!/bin/sh\ncat <<'OUT'\n{output}\nOUT\n")
    path.chmod(0o755)


def test_missing_libraries_are_named_with_the_install_command(tmp_path, monkeypatch):
    qt = tmp_path / "Qt"
    (qt / "plugins/platforms").mkdir(parents=True)
    (qt / "plugins/platforms/libqxcb.so").write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "ldd", "\tlibxcb-icccm.so.4 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)")
    _tool(bin_dir, "ldconfig", "\tlibxcb-keysyms.so.1 (libc6,x86-64) => /lib/libxcb-keysyms.so.1")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    missing = system_libs.missing_libraries(qt)
    assert missing == ["libxcb-icccm.so.4", "libxcb-cursor.so.0"]
    text = system_libs.advice(missing)
    assert "sudo apt-get install libxcb-icccm4 libxcb-cursor0" in text


def test_only_x11_desktops_on_linux_are_checked(monkeypatch):
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert not system_libs.applies()
    assert system_libs.main() == 0
