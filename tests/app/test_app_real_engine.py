"""End to end: the app starts the real engine (`python -m engine.cli run --swarm local`) and drives it.

Slow (the engine starts a local swarm of two demo servers hosting SmolLM2): run with `-m slow`.
"""

from __future__ import annotations

import importlib.util

import psutil
import pytest

from app.controller import AppController
from app.engine_process import log_tail
from app.settings import Settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("engine.service_cli") is None, reason="the engine's `run` command is missing"
    ),
]

START_TIMEOUT_MS = 180_000


@pytest.fixture
def real_app(qtbot, app_dirs, link_smollm2):
    link_smollm2(app_dirs["data"])  # prepared once per test session (the engine would take ~20 s to)
    ctl = AppController(Settings(onboarded=True, swarm="local"), use_system_tray=False)
    ctl.confirm_quit = False
    ctl.quit_app = lambda: None
    ctl.start()
    try:
        qtbot.waitUntil(
            lambda: ctl.engine.state == "running" and ctl.feed.connected, timeout=START_TIMEOUT_MS
        )
        yield ctl
    finally:
        pid = ctl.engine.pid
        ctl.shutdown()
        assert (
            pid is None or not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        )


def test_share_toggle_with_the_real_engine(qtbot, real_app):
    window = real_app.dashboard
    qtbot.waitUntil(lambda: real_app.dashboard_model.snapshot.hardware is not None, timeout=30_000)
    # Disabled ("Joining the swarm…") until the engine is ready to host.
    qtbot.waitUntil(lambda: window.share_button.isEnabled(), timeout=START_TIMEOUT_MS)
    window.share_button.click()
    try:
        qtbot.waitUntil(lambda: real_app.tray.state == "serving", timeout=START_TIMEOUT_MS)
    except Exception:
        status = real_app.dashboard_model.snapshot.status
        last = real_app.presenter.last
        pytest.fail(
            f"never served; status {status}; app said {last!r}\n{log_tail(real_app.engine.log_path, 30)}"
        )
    assert window.share_button.isChecked() and "serving blocks" in window.headline.text()
    window.share_button.click()
    qtbot.waitUntil(lambda: real_app.tray.state == "idle", timeout=120_000)


def test_chat_answers_from_the_real_engine(qtbot, real_app):
    real_app.show_chat()
    chat = real_app.chat_window
    qtbot.waitUntil(lambda: bool(real_app.chat_model.models), timeout=60_000)
    # The local swarm's default model is a real one: picked first, no "gibberish" notice.
    choice = real_app.chat_model.current_model()
    assert choice.id == "SmolLM2-135M-Instruct" and not choice.random_weights
    assert not chat.demo_label.isVisible()
    chat.temperature.setValue(0.0)
    chat.max_tokens.setValue(24)
    chat.input.setPlainText("What is the capital of France?")
    chat.send_button.click()
    qtbot.waitUntil(lambda: not real_app.chat_model.streaming, timeout=START_TIMEOUT_MS)
    assert not chat.notice.isVisible() or "limit" in chat.notice.text(), chat.notice.text()
    reply = real_app.chat_model.messages[-1]
    assert reply.role == "assistant" and "Paris" in reply.content, reply.content
    assert "Paris" in chat.transcript.toPlainText()
