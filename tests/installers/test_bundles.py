"""The frozen GUI bundle and the Linux bundle, built here and run offscreen (slow: ~90 s on 2 cores).

One PyInstaller build per session; then the frozen app must reach a working engine, and the Linux bundle must
install into a temporary HOME, launch from its launcher, and uninstall without leaving its files behind.
The engine's dependencies come from this virtual environment (POLLINATE_OFFLINE_SITE_PACKAGES): no download.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("PyInstaller") is None, reason="pip install -e '.[bundle]'"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the bundles are built and run on Linux"),
]


def load_build_bundle():
    spec = importlib.util.spec_from_file_location("build_bundle", ROOT / "installers" / "build_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    build_bundle = load_build_bundle()
    dist = tmp_path_factory.mktemp("dist")
    build_bundle.build(dist, tmp_path_factory.mktemp("work"))
    return build_bundle, dist


def test_frozen_app_starts_and_reaches_a_working_engine(frozen):
    build_bundle, dist = frozen
    folder = dist / "pollinate"
    assert build_bundle.engine_parts_inside(folder) == []  # no torch, hivemind or engine in the GUI
    assert not list(folder.rglob("libtorch*"))
    report = build_bundle.smoke_run(build_bundle.binary(dist))
    assert report["shown"], report
    assert report["engine_state"] == "running", report
    assert not report["engine_left_running"], "quitting left the engine running"


def test_linux_bundle_installs_launches_and_uninstalls(frozen, tmp_path):
    _build_bundle, dist = frozen
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    made = subprocess.run(
        [str(ROOT / "installers" / "linux" / "make_bundle.sh"), str(dist), str(out)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    bundle = Path(made.stdout.strip().splitlines()[-1])
    assert (bundle / "gui" / "pollinate").exists() and list((bundle / "wheels").glob("pollinate-*.whl"))

    home = tmp_path / "home"
    home.mkdir()
    user_env = {
        "HOME": str(home),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHON": getattr(sys, "_base_executable", sys.executable),  # a plain Python, as a user has
        "POLLINATE_OFFLINE_SITE_PACKAGES": sysconfig.get_paths()["purelib"],
    }
    installed = subprocess.run(
        [str(bundle / "install.sh")], env=user_env, capture_output=True, text=True, timeout=600
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    share = home / ".local" / "share"
    launcher = home / ".local" / "bin" / "pollinate"
    desktop = share / "applications" / "pollinate.desktop"
    assert launcher.resolve() == share / "pollinate" / "gui" / "pollinate"
    assert f"Exec={share}/pollinate/gui/pollinate" in desktop.read_text()
    if shutil.which("desktop-file-validate"):
        subprocess.run(["desktop-file-validate", str(desktop)], check=True)

    run_env = {**user_env, "QT_QPA_PLATFORM": "offscreen", "HF_HUB_OFFLINE": "1"}
    launched = subprocess.run(
        [str(launcher), "--report-engine", "200", "--engine-arg=--demo-model=tiny"],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    reports = [line for line in launched.stdout.splitlines() if line.startswith("{")]
    assert launched.returncode == 0 and reports, launched.stderr[-3000:]
    report = json.loads(reports[-1])
    assert report["shown"] and report["engine_state"] == "running", report
    log = (share / "pollinate" / "logs" / "engine.log").read_text()
    assert f"starting: {share}/pollinate/engine-venv/bin/python -m engine.cli run" in log
    assert not (share / "pollinate" / "engine-state.json").exists(), "quitting left the engine running"

    uninstaller = share / "pollinate" / "uninstall.sh"
    removed = subprocess.run([str(uninstaller), "--uninstall"], env=user_env, capture_output=True, text=True)
    assert removed.returncode == 0, removed.stderr
    for path in (launcher, desktop, share / "pollinate" / "gui", share / "pollinate" / "engine-venv"):
        assert not path.exists() and not path.is_symlink(), path
    assert (share / "pollinate" / "chat-history.sqlite3").exists()  # the user's data stays unless purged
    purged = subprocess.run(
        [str(bundle / "install.sh"), "--uninstall", "--purge"], env=user_env, capture_output=True, text=True
    )
    assert purged.returncode == 0 and not (share / "pollinate").exists()
    assert not (home / ".config" / "pollinate").exists()
