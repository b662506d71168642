"""End to end through WSL without Windows: the app's WSL backend drives the real engine behind a fake wsl.exe.

The fake (tests/helpers/fake_wsl.py) runs `--exec` commands as local children that see only the
distribution's environment and WSLENV, like WSL. Slow: the real engine builds the demo model and a swarm.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
import pytest

from app.controller import AppController
from app.engine_process import log_tail
from app.settings import Settings
from app.wsl_backend import WslBackend, WslConfig
from tests.helpers import fake_wsl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_MS = 180_000


def test_app_runs_the_real_engine_through_wsl(qtbot, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    fake = fake_wsl.install(
        bin_dir,
        distributions={"Pollinate": {"state": "Stopped", "version": 2}},
        # What the distribution has: the engine importable by its Python, offline hub.
        environment={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    inside_data = tmp_path / "inside-data"
    backend = WslBackend(WslConfig(python=sys.executable, data_dir=str(inside_data)))
    ctl = AppController(
        Settings(onboarded=True, swarm="local"),
        engine_backend=backend,
        engine_args=("--demo-model=tiny",),  # the light demo: this test is about the way in, not the model
        use_system_tray=False,
    )
    ctl.confirm_quit = False
    ctl.quit_app = lambda: None
    ctl.start()
    try:
        running = lambda: ctl.engine.state == "running" and ctl.feed.connected  # noqa: E731
        qtbot.waitUntil(running, timeout=START_TIMEOUT_MS)
        started = [call for call in fake.calls() if "engine.cli" in call]
        assert started and started[0][:3] == ["-d", "Pollinate", "--exec"]
        assert started[0][-1] == "--exit-on-stdin-eof" and "--parent-pid" not in started[0]
        wsl_exe = ctl.engine._process.pid
        engine = psutil.Process(ctl.engine.pid)
        assert engine.ppid() == wsl_exe  # the engine runs "inside", wsl.exe relays it
        assert (inside_data / "engine-state.json").exists()
        assert not (ctl.data_dir / "engine-state.json").exists()  # nothing crosses but through wsl.exe

        # Chat answers.
        ctl.show_chat()
        try:
            qtbot.waitUntil(lambda: bool(ctl.chat_model.models), timeout=60_000)
        except Exception:
            status = ctl.dashboard_model.snapshot.status
            pytest.fail(f"no models: {status} {ctl.presenter.last!r}\n{log_tail(ctl.engine.log_path, 30)}")
        ctl.chat_model.select_model(ctl.chat_model.models[0].id)
        ctl.chat_window.max_tokens.setValue(8)
        ctl.chat_window.input.setPlainText("Hello from Windows")
        ctl.chat_window.send_button.click()
        qtbot.waitUntil(lambda: not ctl.chat_model.streaming, timeout=START_TIMEOUT_MS)
        reply = ctl.chat_model.messages[-1]
        assert reply.role == "assistant" and reply.content.strip()

        # Sharing toggles.
        window = ctl.dashboard
        qtbot.waitUntil(lambda: window.share_button.isEnabled(), timeout=START_TIMEOUT_MS)
        window.share_button.click()
        try:
            qtbot.waitUntil(lambda: ctl.tray.state == "serving", timeout=START_TIMEOUT_MS)
        except Exception:
            pytest.fail(f"never served: {ctl.presenter.last!r}\n{log_tail(ctl.engine.log_path, 30)}")
        window.share_button.click()
        qtbot.waitUntil(lambda: ctl.tray.state == "idle", timeout=120_000)
    finally:
        engine_pid = ctl.engine.pid
        process = ctl.engine._process
        ctl.shutdown()  # quit stops it
    assert process is not None and process.poll() is not None, "wsl.exe still runs after quit"
    assert engine_pid is None or not psutil.pid_exists(engine_pid)
    assert not (inside_data / "engine-state.json").exists(), "the engine did not stop gracefully"
