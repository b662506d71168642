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
