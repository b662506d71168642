"""Polite sharing in the app (offscreen, against the fake engine): pause buttons in the dashboard and tray,
the paused state and its reason in both, the policies in Settings (round trip, sent to the engine, and the
detectors the engine cannot run here marked as unsupported)."""

from __future__ import annotations

import datetime as dt
import time

from app.settings import load_settings
from app.viewmodels.pause import pause_text, until_tomorrow
from app.viewmodels.status import tray_state, tray_tooltip


def _serve(qtbot, controller, fake_engine):
    fake_engine.load_delay = 0.01
    qtbot.waitUntil(controller.dashboard.share_button.isEnabled, timeout=3000)  # the first status came
    controller.dashboard.share_button.click()
    qtbot.waitUntil(lambda: controller.tray.state == "serving", timeout=5000)


def test_pause_for_an_hour_from_the_dashboard_then_resume_from_the_tray(qtbot, controller, fake_engine):
    window = controller.dashboard
    assert not window.pause_hour_button.isEnabled()  # nothing to pause before sharing
    _serve(qtbot, controller, fake_engine)
    assert window.pause_hour_button.isEnabled() and not window.resume_button.isVisible()
    window.pause_hour_button.click()
    qtbot.waitUntil(lambda: controller.tray.state == "paused", timeout=3000)
    post = next(r for r in fake_engine.requests if r[1] == "/api/hosting/pause")
    assert post[2]["seconds"] == 3600
    assert "Paused by you until" in window.headline.text() and window.pause_label.isVisible()
    assert window.share_button.isChecked() and "Paused" in window.share_button.text()
    assert not window.resume_button.isHidden() and window.pause_hour_button.isHidden()
    assert controller.tray.resume_action.isVisible() and not controller.tray.pause_hour_action.isVisible()
    controller.tray.resume_action.trigger()
    qtbot.waitUntil(lambda: controller.tray.state == "serving", timeout=3000)
    assert not window.pause_label.isVisible()


def test_pause_until_tomorrow_from_the_tray(qtbot, controller, fake_engine):
    _serve(qtbot, controller, fake_engine)
    controller.tray.pause_tomorrow_action.trigger()
    qtbot.waitUntil(lambda: controller.tray.state == "paused", timeout=3000)
    post = next(r for r in fake_engine.requests if r[1] == "/api/hosting/pause")
    tomorrow = dt.datetime.fromtimestamp(post[2]["until"])
    assert tomorrow.date() == dt.date.today() + dt.timedelta(days=1) and (tomorrow.hour, tomorrow.minute) == (
        8,
        0,
    )


def test_a_policy_pause_shows_its_reason_in_dashboard_and_tray(qtbot, controller, fake_engine):
    _serve(qtbot, controller, fake_engine)
    pause = dict(reason="fullscreen", message="steam_app_1245620 is in full screen", since=time.time(),
                 until=None, mode="release", source="policy")  # fmt: skip
    fake_engine.set_status(state="paused", pause=pause)
    window = controller.dashboard
    qtbot.waitUntil(lambda: controller.tray.state == "paused", timeout=3000)
    assert "steam_app_1245620 is in full screen" in window.headline.text()
    assert "resumes by itself" in window.pause_label.text()
    # A policy's pause ends by itself: no Resume (it would pause again at once), and no new pause.
    assert window.resume_button.isHidden() and not window.pause_hour_button.isEnabled()
    assert not controller.tray.resume_action.isVisible()
    status = controller.dashboard_model.snapshot.status
    assert "full screen" in tray_tooltip("running", "", status)


def test_policies_in_settings_round_trip_and_reach_the_engine(qtbot, controller, fake_engine):
    qtbot.waitUntil(lambda: controller.policy_info is not None, timeout=3000)
    sent = [r for r in fake_engine.requests if r[:2] == ("PUT", "/api/policy")]
    assert sent and sent[0][2]["pause_on_fullscreen"] is True and sent[0][2]["gpu_busy_percent"] == 20.0
    assert sent[0][2]["cpu_busy_percent"] is None  # gaming-PC defaults: CPU use does not pause GPU hosting
    controller.show_settings()
    dialog = controller.settings_dialog_open
    polite = dialog.polite
    assert "no NVIDIA driver" in polite.unsupported["gpu_busy"].text()  # said, not silently ignored
    assert polite.unsupported["cpu_busy"].text() == ""
    polite.exclusive.setText("eldenring, steam*")
    polite.cpu_busy.setValue(50)
    polite.battery.setChecked(False)
    polite.schedule.setText("mon-fri 18:00-23:30; sat 00:00-24:00")
    polite.max_sessions.setValue(2)
    polite.compute_share.setValue(50)
    dialog.accept()
    saved = load_settings()
    assert saved.exclusive_apps == ("eldenring", "steam*") and saved.cpu_busy_percent == 50.0
    assert not saved.pause_on_battery and saved.schedule == ("mon-fri 18:00-23:30", "sat 00:00-24:00")
    qtbot.waitUntil(lambda: len([r for r in fake_engine.requests if r[:2] == ("PUT", "/api/policy")]) == 2)
    body = [r for r in fake_engine.requests if r[:2] == ("PUT", "/api/policy")][-1][2]
    assert body["exclusive_apps"] == ["eldenring", "steam*"] and body["pause_on_battery"] is False
    assert body["max_sessions"] == 2 and body["compute_share"] == 0.5
    controller.show_settings()  # the dialog shows what was saved
    again = controller.settings_dialog_open.polite
    assert again.exclusive.text() == "eldenring, steam*" and again.cpu_busy.value() == 50
    controller.settings_dialog_open.reject()


def test_pause_words_and_tray_state():
    now = dt.datetime(2026, 11, 27, 14, 0)
    status = {"state": "paused", "pause": {"message": "The GPU is hot (88 °C)", "source": "policy"}}
    assert (
        pause_text(status, now)
        == "Paused: The GPU is hot (88 °C) — sharing resumes by itself when that clears"
    )
    status["pause"]["until"] = dt.datetime(2026, 11, 28, 18, 0).timestamp()
    assert pause_text(status, now).endswith("until Sat 18:00")
    assert tray_state("running", {"state": "draining", "pause": status["pause"]}) == "paused"
    assert tray_state("running", {"state": "paused"}) == "paused"
    assert pause_text({"state": "serving"}) == ""
    assert dt.datetime.fromtimestamp(until_tomorrow(dt.datetime(2026, 12, 31, 23, 30))) == dt.datetime(
        2027, 1, 1, 8
    )
