"""App test fixtures: private data/config dirs per test and a fake engine on 127.0.0.1."""

from __future__ import annotations

import pytest
from fake_engine import TOKEN, FakeEngine


@pytest.fixture(autouse=True)
def app_dirs(tmp_path, monkeypatch):
    """Every app test writes only under tmp_path (settings, history, engine state, autostart entry)."""
    dirs = {name: tmp_path / name for name in ("data", "config", "xdg")}
    for path in dirs.values():
        path.mkdir()
    monkeypatch.setenv("POLLINATE_DATA_DIR", str(dirs["data"]))
    monkeypatch.setenv("POLLINATE_CONFIG_DIR", str(dirs["config"]))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(dirs["xdg"]))
    # Never touch the real keyring: the "fail" backend behaves like a machine without one.
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    return dirs


@pytest.fixture
def fake_engine():
    engine = FakeEngine()
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def api_client(qapp, fake_engine):
    from app.api_client import ApiClient, EngineEndpoint

    client = ApiClient()
    client.set_endpoint(EngineEndpoint(fake_engine.base_url, TOKEN))
    yield client
    client.set_endpoint(None)


@pytest.fixture
def controller(qtbot, app_dirs, fake_engine):
    """An AppController attached (--no-engine) to the in-process fake engine, running and subscribed."""
    from app.controller import AppController
    from app.settings import Settings

    fake_engine.write_state_file(app_dirs["data"])
    ctl = AppController(Settings(onboarded=True), manage_engine=False, use_system_tray=False)
    ctl.confirm_quit = False
    ctl.quit_app = lambda: None
    ctl.start()
    qtbot.waitUntil(lambda: ctl.engine.state == "running" and ctl.feed.connected, timeout=5000)
    qtbot.waitUntil(lambda: ctl.dashboard_model.snapshot.hardware is not None, timeout=5000)
    qtbot.waitUntil(lambda: ctl.dashboard_model.snapshot.status is not None, timeout=5000)
    yield ctl
    ctl.shutdown()
    for window in (ctl.dashboard, ctl._chat_window):
        if window is not None:
            window.deleteLater()
    qtbot.wait(20)
