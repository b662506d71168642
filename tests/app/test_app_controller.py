"""The whole app against the fake engine: Share toggle, tray menu, dashboard stats, settings, quit."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from app import autostart
from app.controller import AppController
from app.settings import Settings, load_settings

FAKE = str(Path(__file__).with_name("fake_engine.py"))


def test_without_system_tray_the_dashboard_is_shown_and_closing_it_quits(qtbot, controller):
    assert controller.dashboard.isVisible()
    assert not controller.dashboard.hide_on_close
    with qtbot.waitSignal(controller.quitting):
        controller.dashboard.close()
    assert controller.engine.state == "stopped"


def test_share_toggle_loads_then_serves_and_persists(qtbot, controller, fake_engine):
    window = controller.dashboard
    fake_engine.load_delay = 0.15
    assert window.share_button.isEnabled() and not window.share_button.isChecked()
    window.share_button.click()
    qtbot.waitUntil(lambda: window.progress.isVisible(), timeout=3000)
    qtbot.waitUntil(lambda: controller.tray.state == "loading", timeout=3000)
    qtbot.waitUntil(lambda: controller.tray.state == "serving", timeout=5000)
    assert window.share_button.isChecked() and not window.progress.isVisible()
    assert "serving blocks 0–3" in window.headline.text()
    assert controller.tray.share_action.isChecked()
    assert load_settings().sharing_enabled  # resumes at next start
    post = next(r for r in fake_engine.requests if r[1] == "/api/hosting/start")
    assert post[2]["memory_fraction"] == 0.5 and "quant" not in post[2]  # "auto" lets the engine choose
    # the coverage picture shows the blocks hosted here
    qtbot.waitUntil(lambda: [c.servers for c in window.block_map.cells][:4] == [2, 2, 2, 2], timeout=3000)
    assert [c.mine for c in window.block_map.cells] == [True] * 4 + [False] * 4

    controller.tray.share_action.trigger()  # stop from the tray menu
    qtbot.waitUntil(lambda: controller.tray.state == "idle", timeout=3000)
    assert not window.share_button.isChecked()
    assert not load_settings().sharing_enabled


def test_hosting_error_is_presented(qtbot, controller, fake_engine):
    fake_engine.hosting_error = (
        503,
        {"message": "Not enough GPU memory for one block.", "type": "x", "code": 503},
    )
    controller.dashboard.share_button.click()
    qtbot.waitUntil(lambda: "Not enough GPU memory" in controller.presenter.last, timeout=3000)
    assert "Could not start sharing" in controller.dashboard.statusBar().currentMessage()
    assert not controller.dashboard.share_button.isChecked()


def test_stats_events_update_numbers_and_plot(qtbot, controller, fake_engine):
    window = controller.dashboard
    for i in range(4):
        fake_engine.add_stats(tokens=10 * (i + 1), requests=1, points=2.5 * i, sessions_active=1)
        qtbot.wait(30)
    qtbot.waitUntil(lambda: window.stat_labels["lifetime_tokens_served"].text() == "100", timeout=3000)
    assert window.stat_labels["lifetime_requests_served"].text() == "4"
    # Points stay at 0 while only the user's own chats use the blocks: the number says why where it stands.
    assert "your own chats earn none" in window.stat_labels["points"].toolTip()
    assert len(window.plot.points) >= 3
    assert "RTX 4090" in window.hardware_label.text()
    assert "every block is served" in window.swarm_label.text()
    window.tabs.setCurrentWidget(window.swarm_view)
    assert window.swarm_view.table.rowCount() == 1  # the fake swarm's one server
    assert window.swarm_view.table.item(0, 1).text() == "0.1.0"
    window.grab()  # paints the block map and the plot


def test_tray_menu_opens_windows(qtbot, controller):
    controller.tray.chat_action.trigger()
    assert controller.chat_window.isVisible()
    controller.dashboard.hide()
    controller.tray.dashboard_action.trigger()
    assert controller.dashboard.isVisible()
    controller.tray.settings_action.trigger()
    dialog = controller.settings_dialog_open
    assert dialog is not None and dialog.isVisible()
    dialog.reject()
    with qtbot.waitSignal(controller.quitting):
        controller.tray.quit_action.trigger()


def test_dashboard_buttons_open_chat_and_settings_without_a_tray(qtbot, controller):
    """Without a system tray the dashboard is the only window: chat and settings must be reachable from it."""
    assert not controller.tray.available
    controller.dashboard.chat_button.click()
    assert controller.chat_window.isVisible()
    controller.dashboard.settings_button.click()
    dialog = controller.settings_dialog_open
    assert dialog is not None and dialog.isVisible()
    dialog.reject()


def test_settings_dialog_saves_and_autostart_is_really_removed(qtbot, controller):
    controller.show_settings()
    dialog = controller.settings_dialog_open
    dialog.autostart.setChecked(True)
    dialog.keep_sharing.setChecked(True)
    dialog.memory.slider.setValue(70)
    dialog.quant.setCurrentIndex(dialog.quant.findData("nf4"))
    dialog.accept()
    saved = load_settings()
    assert (
        saved.autostart
        and saved.keep_sharing_on_close
        and saved.memory_fraction == 0.7
        and saved.quant == "nf4"
    )
    entry = autostart.linux_entry_path()
    assert entry.exists() and "-m app" in entry.read_text()
    assert str(entry).startswith(str(Path(controller.data_dir).parent))  # under the test's XDG_CONFIG_HOME

    controller.show_settings()
    dialog = controller.settings_dialog_open
    assert dialog.autostart.isChecked()
    dialog.autostart.setChecked(False)
    dialog.hf_token.setText("hf_secret")  # no keyring in tests: the app says so
    dialog.accept()
    assert not entry.exists()
    assert "keyring" in controller.presenter.last


def test_share_while_engine_joins_starts_once_ready(qtbot, controller, fake_engine):
    fake_engine.set_status(ready=False)
    qtbot.waitUntil(lambda: not controller.dashboard.share_button.isEnabled(), timeout=3000)
    assert "Joining" in controller.dashboard.share_button.text()
    error = {
        "message": "The engine is still starting (Joining the swarm); try again in a moment.",
        "type": "engine_not_ready",
        "code": 503,
    }
    fake_engine.hosting_error = (503, error)
    controller.dashboard_model.set_sharing(True)  # e.g. resumed at start
    qtbot.waitUntil(lambda: controller.dashboard_model._start_when_ready, timeout=3000)
    fake_engine.hosting_error = None
    fake_engine.set_status(ready=True)
    qtbot.waitUntil(lambda: controller.tray.state == "serving", timeout=5000)


def test_dashboard_shows_the_demo_model_being_prepared(qtbot, controller, fake_engine):
    message = "Preparing the demo model SmolLM2-135M-Instruct (first start only): dequantizing the weights"
    fake_engine.set_status(ready=False, progress=0.25, message=message)
    window = controller.dashboard
    qtbot.waitUntil(lambda: window.progress.isVisible() and window.progress.value() == 250, timeout=3000)
    assert window.headline.text() == message and not window.share_button.isEnabled()
    assert "Preparing" in window.share_button.text()
    fake_engine.set_status(ready=True, progress=None, message=None)
    qtbot.waitUntil(lambda: window.share_button.isEnabled() and not window.progress.isVisible(), timeout=3000)


def test_chat_lists_models_once_the_engine_is_ready(qtbot, controller, fake_engine):
    fake_engine.set_status(ready=False)
    qtbot.waitUntil(lambda: not controller.dashboard.share_button.isEnabled(), timeout=3000)
    controller.chat_model.models = []
    controller.chat_model.refresh_models()  # answered 503 engine_not_ready: no notice, wait for the event
    qtbot.wait(300)
    assert not controller.chat_model.models and "list the models" not in controller.chat_model.notice
    fake_engine.set_status(ready=True)  # the engine's status event when `ready` changes
    qtbot.waitUntil(lambda: bool(controller.chat_model.models), timeout=3000)


def test_quit_plan_follows_keep_sharing(qtbot, controller, fake_engine):
    controller.dashboard_model.set_sharing(True)
    qtbot.waitUntil(lambda: controller.tray.state == "serving", timeout=5000)
    assert controller.quit_plan() == "stop"  # --no-engine: never ours to keep or stop
    assert "Quit" in controller.quit_text() or "stops" in controller.quit_text()


def test_quitting_stops_sharing_as_the_quit_dialog_says(qtbot, controller, fake_engine):
    """The dialog says quitting stops sharing: the next start must not turn it back on by itself."""
    controller.dashboard_model.set_sharing(True)
    qtbot.waitUntil(lambda: controller.tray.state == "serving", timeout=5000)
    assert load_settings().sharing_enabled
    assert "Sharing stays off" in controller.quit_text()
    controller.quit()
    assert not load_settings().sharing_enabled


def test_app_restarts_crashed_engine_and_says_so(qtbot, app_dirs):
    ctl = AppController(
        Settings(onboarded=True),
        engine_command_factory=lambda: [sys.executable, FAKE],
        use_system_tray=False,
    )
    ctl.engine.backoff_s = (0.1,)
    ctl.confirm_quit = False
    ctl.quit_app = lambda: None
    try:
        ctl.start()
        qtbot.waitUntil(lambda: ctl.engine.state == "running" and ctl.feed.connected, timeout=15000)
        ctl.show_chat()
        pid = ctl.engine.pid
        import os
        import signal

        os.kill(pid, signal.SIGKILL)
        qtbot.waitUntil(lambda: ctl.engine.state == "restarting", timeout=5000)
        assert "stopped unexpectedly" in ctl.dashboard.headline.text()
        assert ctl.tray.state == "paused"
        assert ctl.chat_window.notice.isVisible() and "stopped unexpectedly" in ctl.chat_window.notice.text()
        assert not ctl.chat_window.send_button.isEnabled()
        qtbot.waitUntil(lambda: ctl.engine.state == "running", timeout=15000)
        qtbot.waitUntil(lambda: "restarted" in ctl.presenter.last, timeout=5000)
        assert "restarted" in ctl.dashboard.statusBar().currentMessage()
        new_pid = ctl.engine.pid
    finally:
        ctl.shutdown()
    import psutil

    assert not psutil.pid_exists(new_pid) or psutil.Process(new_pid).status() == psutil.STATUS_ZOMBIE


def test_swarm_unreachable_says_one_sentence_with_retry_and_local_demo(qtbot, controller, fake_engine):
    """Public swarm without internet: no "Hosting failed", no raw addresses, two ways forward."""
    window = controller.dashboard
    controller.apply_settings(Settings(onboarded=True, swarm="public"))
    sentence = "Cannot reach the public swarm: none of its entry peers answered. Check the connection."
    fake_engine.set_status(state="error", ready=False, message=sentence, swarm="public")
    qtbot.waitUntil(lambda: window.retry_button.isVisible(), timeout=3000)
    assert window.headline.text() == sentence and "Hosting failed" not in window.headline.text()
    assert window.local_demo_button.isVisible() and not window.share_button.isEnabled()
    assert window.block_map.note.startswith("No data about the swarm")
    window.local_demo_button.click()
    assert load_settings().swarm == "local"


def test_plan_follows_the_chosen_quantization_and_memory_share(qtbot, controller, fake_engine):
    window = controller.dashboard
    qtbot.waitUntil(lambda: "nf4" in window.plan_label.text(), timeout=3000)
    assert "GPU memory" in window.plan_label.text()
    controller.apply_settings(Settings(onboarded=True, quant="int8", memory_fraction=0.8))
    qtbot.waitUntil(lambda: "int8" in window.plan_label.text(), timeout=3000)
    request = [r for r in fake_engine.requests if r[1] == "/api/hosting/plan"][-1]
    assert "16.8 GB share" in window.plan_label.text()  # 80 % of the fake GPU's 21 GB free
    assert request[0] == "GET"


def test_a_new_memory_share_resizes_the_hosting_and_the_move_shows(qtbot, controller, fake_engine):
    window = controller.dashboard
    fake_engine.load_delay = 0.01
    window.share_button.click()
    qtbot.waitUntil(lambda: controller.tray.state == "serving", timeout=5000)
    controller.apply_settings(Settings(onboarded=True, memory_fraction=0.2))
    qtbot.waitUntil(lambda: any(r[1] == "/api/hosting/resize" for r in fake_engine.requests), timeout=3000)
    resize = next(r for r in fake_engine.requests if r[1] == "/api/hosting/resize")
    assert resize[0] == "POST" and resize[2] == {"memory_fraction": 0.2}
    assert controller.engine.state == "running"  # no engine restart for a new share
    # The engine moves the span: the dashboard and the tray say so from the typed status, not its prose.
    move = dict(reason="share", message="(prose the app does not parse)", from_blocks=[0, 8],
                to_blocks=[4, 7], since=time.time())  # fmt: skip
    fake_engine.set_status(state="draining", move=move, message="whatever the engine says")
    qtbot.waitUntil(lambda: "Moving to blocks 4–6" in window.headline.text(), timeout=3000)
    assert "you changed the memory share" in window.headline.text()
    assert window.share_button.isChecked() and window.share_button.text() == "Moving to other blocks…"
    assert window.share_button.isEnabled() and controller.tray.state == "loading"
    fake_engine.set_status(state="serving", move=None, blocks=[4, 7])
    qtbot.waitUntil(lambda: "serving blocks 4–6" in window.headline.text(), timeout=3000)


def test_a_slow_swarm_read_is_not_piled_up(qtbot, controller, fake_engine):
    """Each /api/swarm holds one of the engine's worker threads: never more than one from the dashboard."""
    model = controller.dashboard_model
    qtbot.waitUntil(lambda: model._swarm_call is None, timeout=5000)  # the start's own read is done
    fake_engine.stalled = {"/api/swarm"}
    controller.client.request_timeout_ms = 600
    before = sum(1 for r in list(fake_engine.requests) if r[1] == "/api/swarm")
    for _ in range(5):
        model.refresh_swarm()
    qtbot.wait(200)
    assert sum(1 for r in list(fake_engine.requests) if r[1] == "/api/swarm") <= before + 1
    # When it times out, one more read follows (it was asked for meanwhile), and it says why it has no data.
    qtbot.waitUntil(
        lambda: "did not answer" in model.snapshot.swarm_error if model.snapshot.swarm_error else False,
        timeout=5000,
    )
    qtbot.waitUntil(
        lambda: sum(1 for r in list(fake_engine.requests) if r[1] == "/api/swarm") == before + 2, timeout=5000
    )
    fake_engine.stalled = set()


def test_sharing_asked_for_before_a_failed_join_does_not_stay_loading(qtbot, controller, fake_engine):
    """Sharing on, then a swarm the engine cannot join: no "Loading blocks… 0 %" that never ends."""
    window = controller.dashboard
    fake_engine.set_status(ready=False)
    qtbot.waitUntil(lambda: not window.share_button.isEnabled(), timeout=3000)
    error = {"message": "The engine is still starting (Joining the swarm).", "type": "engine_not_ready"}
    fake_engine.hosting_error = (503, dict(error, code=503))
    controller.dashboard_model.set_sharing(True)  # as after a restart with sharing on
    qtbot.waitUntil(lambda: controller.dashboard_model._start_when_ready, timeout=3000)
    sentence = "Cannot reach the public swarm: none of its entry peers answered. Check the connection."
    fake_engine.set_status(state="error", ready=False, message=sentence, swarm="public")
    qtbot.waitUntil(lambda: window.retry_button.isVisible(), timeout=3000)
    assert window.share_button.text() == "Share my GPU"
    assert not window.share_button.isEnabled() and not window.share_button.isChecked()
    assert not window.progress.isVisible()
    assert not controller.dashboard_model._start_when_ready


def test_chat_offers_no_model_while_the_engine_cannot_join_its_swarm(qtbot, controller, fake_engine):
    """After a switch to an unreachable swarm the chat listed the old swarm's models and answered a message
    with "the engine is still starting… try again in a moment"."""
    chat = controller.chat_window
    chat.show()
    qtbot.waitUntil(lambda: bool(controller.chat_model.models), timeout=3000)
    assert chat.send_button.isEnabled()
    sentence = "Cannot reach the public swarm: none of its entry peers answered. Check the connection."
    fake_engine.set_status(state="error", ready=False, message=sentence, swarm="public")
    qtbot.waitUntil(lambda: not controller.chat_model.models, timeout=3000)
    assert not chat.send_button.isEnabled() and not chat.regenerate_button.isEnabled()
    assert "not connected to a swarm" in chat.model_picker.currentText()
    assert sentence in chat.notice.text() and "still starting" not in chat.notice.text()
    assert not controller.chat_model.send("hello")  # nothing goes out, nothing is added to the chat
    fake_engine.set_status(state="idle", ready=True, message=None, swarm="local")
    qtbot.waitUntil(lambda: bool(controller.chat_model.models), timeout=3000)
    assert chat.send_button.isEnabled() and sentence not in chat.notice.text()


def test_settings_memory_share_says_the_same_gb_as_the_plan(qtbot, controller, fake_engine):
    """The walk (no GPU): Settings said "50 % of free RAM: about 10.6 GB of 21.1 GB" while the plan said
    "of the 6.3 GB share you allow" (CPU hosting may use 80 % of the available RAM; the share is of that)."""
    fake_engine.hardware["gpus"] = []
    controller.apply_settings(Settings(onboarded=True, memory_fraction=0.5, quant="none"))
    controller.dashboard_model.refresh_all()
    window = controller.dashboard
    qtbot.waitUntil(lambda: "of RAM of the 19.2 GB share" in window.plan_label.text(), timeout=3000)
    dialog = controller.settings_dialog()
    qtbot.addWidget(dialog)
    assert dialog.memory.label.text() == "50 % of free RAM: about 19.2 GB of 38.4 GB"
    dialog.memory.slider.setValue(25)
    assert "about 9.6 GB" in dialog.memory.label.text()


def test_each_part_of_the_dashboard_is_titled_once(qtbot, controller):
    """The walk: "Your contribution" was written twice, as the tab and again as a box inside it."""
    from app.qt import QGroupBox

    window = controller.dashboard
    tabs = {window.tabs.tabText(i) for i in range(window.tabs.count())}
    boxes = [box.title() for box in window.findChildren(QGroupBox)]
    assert len(boxes) == len(set(boxes)) and not tabs & set(boxes)
