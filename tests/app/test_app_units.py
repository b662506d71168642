"""Pure parts of the app: reducers, formatting, settings, autostart, single instance, onboarding."""

from __future__ import annotations

import json
import sys

from app import autostart
from app.settings import Settings, load_settings, save_settings, settings_file
from app.single_instance import SingleInstance
from app.viewmodels.chat import (
    ReplyProgress,
    apply_chunk,
    model_choices,
    tokens_per_second,
    transcript_markdown,
)
from app.viewmodels.dashboard import (
    DashboardSnapshot,
    coverage,
    hardware_lines,
    rate_series,
    share_control,
    with_engine,
    with_stats,
    with_status,
)
from app.viewmodels.status import tray_state, tray_tooltip


def test_pyside_keeps_refcounts_of_singletons(qapp):
    """PySide6 6.12.0 on Python 3.11 drops a reference to None/True on every call: the app then aborts."""
    from app.qt import QLabel, QObject, Signal

    class Probe(QObject):
        fired = Signal()

    label, probe = QLabel(), Probe()
    none_before, true_before = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(200):
        label.setText("x")
        probe.fired.emit()
    assert sys.getrefcount(None) >= none_before - 5, "PySide6 leaks None refs: pin PySide6-Essentials<6.12"
    assert sys.getrefcount(True) >= true_before - 5, "PySide6 leaks True refs: pin PySide6-Essentials<6.12"


def test_tray_state_reducer():
    assert tray_state("failed", None) == "error"
    assert tray_state("starting", None) == "loading"
    assert tray_state("restarting", None) == "paused"
    assert tray_state("running", {"state": "idle"}) == "idle"
    assert tray_state("running", {"state": "loading"}) == "loading"
    assert tray_state("running", {"state": "serving"}) == "serving"
    assert tray_state("running", {"state": "draining"}) == "paused"
    assert tray_state("running", {"state": "error"}) == "error"
    tip = tray_tooltip("running", "", {"state": "serving", "blocks": [0, 4], "model": "m"})
    assert "blocks 0–3 of m" in tip


def test_dashboard_reducers():
    snap = with_engine(DashboardSnapshot(), "running", "ok")
    assert not share_control(snap).enabled  # until the engine's first status says it is ready
    snap = with_status(snap, {"state": "idle", "ready": True})
    assert share_control(snap).enabled and not share_control(snap).checked
    snap = with_status(snap, {"state": "loading", "progress": 0.25, "blocks": [2, 4]})
    control = share_control(snap)
    assert control.checked and control.progress == 0.25
    snap = with_status(snap, {"state": "serving", "blocks": [2, 4]})
    assert share_control(snap).checked and share_control(snap).progress is None
    snap = dataclass_replace(snap, swarm={"total_blocks": 5, "blocks": [{"index": 0, "servers": 0}]})
    cells = coverage(snap)
    assert [c.mine for c in cells] == [False, False, True, True, False]
    assert cells[0].servers == 0
    assert share_control(with_engine(snap, "restarting", "")).enabled is False
    for t, tokens in ((0.0, 0), (1.0, 10), (3.0, 30)):
        snap = with_stats(snap, {"tokens_served": tokens}, t)
    assert rate_series(snap.history) == [(1.0, 10.0), (3.0, 10.0)]


def dataclass_replace(snap, **changes):
    import dataclasses

    return dataclasses.replace(snap, **changes)


def test_displayed_stats_move_the_clocks_on_between_events():
    from app.viewmodels.dashboard import DashboardSnapshot, displayed_stats, with_stats, with_status

    assert displayed_stats(DashboardSnapshot(), 100.0) is None
    stats = {"uptime_seconds": 10, "hosting_seconds": 4, "points": 2}
    snap = with_stats(DashboardSnapshot(engine_state="running"), stats, now=100.0)
    idle = displayed_stats(snap, 107.0)
    assert idle["uptime_seconds"] == 17 and idle["hosting_seconds"] == 4 and idle["points"] == 2
    serving = displayed_stats(with_status(snap, {"state": "serving"}, now=90.0), 107.0)
    assert serving["uptime_seconds"] == 17 and serving["hosting_seconds"] == 11
    started_later = displayed_stats(with_status(snap, {"state": "serving"}, now=105.0), 107.0)
    assert started_later["hosting_seconds"] == 6


def test_hardware_lines_without_gpu_show_cpu_and_ram():
    lines = hardware_lines(
        {
            "gpus": [],
            "cpu": {"name": "Xeon", "cores": 8},
            "ram": {"total_bytes": 16 * 2**30, "available_bytes": 8 * 2**30},
        }
    )
    assert "No GPU" in lines[0] and "Xeon, 8 cores" in lines[1] and "8.0 GB available of 16.0 GB" in lines[2]


def test_chat_reducers():
    progress = ReplyProgress(started=0.0)
    for i, word in enumerate(["Hel", "lo", " there"]):
        chunk = {"choices": [{"delta": {"content": word}, "finish_reason": None}]}
        progress = apply_chunk(progress, json.dumps(chunk), now=1.0 + i)
    progress = apply_chunk(
        progress,
        json.dumps({"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": {"completion_tokens": 3}}),
        now=3.0,
    )
    progress = apply_chunk(progress, "[DONE]", now=3.0)
    assert progress.text == "Hello there" and progress.finish_reason == "stop"
    assert tokens_per_second(progress, now=3.0) == 1.0
    choices = model_choices(
        {
            "data": [
                {"id": "demo", "pollinate": {"label": "Demo", "demo": True, "random_weights": True}},
                {"id": "smol", "pollinate": {"label": "Smol (small real model)", "demo": True}},
                {"id": "real", "pollinate": {"label": "Real", "demo": False}},
            ]
        }
    )
    # Random-weight demos go last; a real model on the demo swarm is an ordinary choice, not "gibberish".
    assert [c.id for c in choices] == ["smol", "real", "demo"] and "random weights" in choices[2].display
    assert "random" not in choices[0].display and "local demo swarm" in choices[0].display
    assert "writing" in transcript_markdown([], streaming="x")


def test_settings_roundtrip_and_broken_file(app_dirs):
    assert load_settings() == Settings()
    save_settings(
        Settings(onboarded=True, swarm="private", initial_peers=("/ip4/1.2.3.4/tcp/1",), memory_fraction=2)
    )
    loaded = load_settings()
    assert (
        loaded.onboarded
        and loaded.initial_peers == ("/ip4/1.2.3.4/tcp/1",)
        and loaded.memory_fraction == 0.95
    )
    assert str(settings_file()).startswith(str(app_dirs["config"]))
    settings_file().write_text("{not json")
    assert load_settings() == Settings()
    (aside,) = settings_file().parent.glob("settings.json.corrupt-*")
    assert aside.read_text() == "{not json"


def test_autostart_entry_created_and_removed(app_dirs):
    assert not autostart.is_enabled()
    autostart.set_enabled(True, ["/usr/bin/python3", "-m", "app", "--minimized"])
    entry = app_dirs["xdg"] / "autostart" / "pollinate.desktop"
    assert autostart.is_enabled() and "Exec=/usr/bin/python3 -m app --minimized" in entry.read_text()
    autostart.set_enabled(False)
    assert not entry.exists() and not autostart.is_enabled()


def test_single_instance_second_launch_raises_the_first(qtbot, app_dirs):
    first, second = SingleInstance(app_dirs["data"]), SingleInstance(app_dirs["data"])
    assert first.claim()
    with qtbot.waitSignal(first.activated, timeout=3000):
        assert not second.claim()
    first.release()
    assert second.claim()  # the first is gone: the next launch becomes the instance
    second.release()


def test_main_exits_at_once_when_an_instance_runs(qtbot, app_dirs):
    from app.main import main

    first = SingleInstance(app_dirs["data"])
    assert first.claim()
    with qtbot.waitSignal(first.activated, timeout=3000):
        assert main(["--no-engine"]) == 0
    first.release()


def test_onboarding_keeps_sharing_off(qtbot, app_dirs):
    from app.windows.onboarding import OnboardingDialog

    dialog = OnboardingDialog(Settings(), free_bytes=8 * 2**30)
    qtbot.addWidget(dialog)
    from app.qt import QLabel

    assert any("Sharing stays <b>off</b>" in label.text() for label in dialog.findChildren(QLabel))
    dialog.swarm_radios["public"].setChecked(True)
    dialog.memory.slider.setValue(30)
    assert "2.4 GB" in dialog.memory.label.text()
    dialog.start_button.click()
    chosen = dialog.result_settings()
    assert chosen.onboarded and chosen.swarm == "public" and chosen.memory_fraction == 0.3
    assert not chosen.sharing_enabled and not chosen.autostart


# ---- an honest dashboard (issue 11) ----------------------------------------------------------------------


def test_block_map_says_discovering_until_the_first_swarm_read():
    from app.viewmodels.dashboard import swarm_note, with_swarm

    snap = with_engine(DashboardSnapshot(), "running", "ok")
    snap = dataclass_replace(snap, plan={"total_blocks": 4, "start_block": 0, "end_block": 2})
    # No red "0" on every block before anyone looked: the counts are unknown.
    assert [c.servers for c in coverage(snap)] == [None] * 4
    assert swarm_note(snap) == "Discovering the swarm…"
    snap = with_swarm(snap, {"total_blocks": 4, "blocks": [{"index": i, "servers": 1} for i in range(4)]})
    assert [c.servers for c in coverage(snap)] == [1] * 4 and swarm_note(snap) == ""
    # A failed read shows no data (never the last swarm's picture).
    snap = with_swarm(snap, None, "the engine did not answer within 15 s")
    assert [c.servers for c in coverage(snap)] == [None] * 4
    assert swarm_note(snap).startswith("No data about the swarm: the engine did not answer")


def test_sharing_time_never_goes_back():
    """Any status event while serving (reachability, say) used to restart the clock: 29 s -> 17 s."""
    from app.viewmodels.dashboard import displayed_stats

    snap = with_engine(DashboardSnapshot(), "running", "ok")
    snap = with_status(snap, {"state": "serving", "blocks": [0, 2]}, now=0.0)
    snap = with_stats(snap, {"hosting_seconds": 5, "lifetime_hosting_seconds": 105}, 5.0)
    shown = [displayed_stats(snap, t)["hosting_seconds"] for t in (19.0,)]
    snap = with_status(
        snap, {"state": "serving", "blocks": [0, 2], "reachability": {"state": "direct"}}, 20.0
    )
    shown += [displayed_stats(snap, t)["hosting_seconds"] for t in (21.0, 22.0)]
    assert shown == sorted(shown) and shown == [19.0, 21.0, 22.0]
    assert displayed_stats(snap, 22.0)["lifetime_hosting_seconds"] == 122.0


def test_stale_figures_are_cleared():
    from app.viewmodels.dashboard import tokens_rate

    snap = with_engine(DashboardSnapshot(), "running", "ok")
    snap = with_status(snap, {"state": "serving", "blocks": [0, 2]}, now=0.0)
    for t, tokens in ((1.0, 0), (2.0, 50)):
        snap = with_stats(snap, {"tokens_served": tokens}, t)
    assert tokens_rate(snap, 2.5) == 50.0
    stopped = with_status(snap, {"state": "idle"}, now=3.0)
    assert tokens_rate(stopped, 3.5) == 0.0 and rate_series(stopped.history)[-1] == (3.0, 0.0)
    assert tokens_rate(snap, 60.0) == 0.0  # no stats for a minute: no claim of 50 tok/s
    # An engine restart (maybe into another swarm) forgets what the old one said.
    restarted = with_engine(
        dataclass_replace(snap, swarm={"total_blocks": 2}, plan={"x": 1}), "restarting", ""
    )
    assert restarted.swarm is None and restarted.plan is None and restarted.history == ()


def test_plan_text_names_the_memory_in_gb():
    from app.viewmodels.dashboard import plan_text

    plan = {
        "model": "m",
        "start_block": 0,
        "end_block": 4,
        "num_blocks": 4,
        "total_blocks": 8,
        "quant": "int8",
        "memory_kind": "ram",
        "budget_bytes": 8 * 1024**3,
        "total_bytes": 3 * 1024**3,
        "weights_bytes": 2 * 1024**3,
        "cache_bytes": 1024**3,
    }
    text = plan_text(plan)
    assert "int8" in text and "3.0 GB of RAM" in text and "8.0 GB share" in text
    assert "GPU memory" in plan_text({**plan, "memory_kind": "gpu"})


def test_join_failure_is_not_a_hosting_failure():
    from app.viewmodels.dashboard import join_failed, swarm_note

    snap = with_engine(DashboardSnapshot(), "running", "ok")
    snap = with_status(snap, {"state": "error", "ready": False, "message": "Cannot reach the public swarm."})
    assert join_failed(snap) and not share_control(snap).enabled
    assert swarm_note(snap).startswith("No data about the swarm")
    hosting_failed = with_status(snap, {"state": "error", "ready": True, "message": "out of memory"})
    assert not join_failed(hosting_failed) and share_control(hosting_failed).enabled


def test_settings_check_peers_as_typed_and_name_the_memory(qtbot, app_dirs):
    from app.windows.settings import SettingsDialog

    dialog = SettingsDialog(Settings(swarm="private"), free_bytes=16 * 1024**3, memory_name="RAM")
    qtbot.addWidget(dialog)
    assert dialog.save_button.isEnabled()  # no peers: a new private swarm starts here
    dialog.peers.setPlainText("/ip4/not-an-address/tcp/abc")
    assert not dialog.save_button.isEnabled()
    assert "'not-an-address' is not an IP address" in dialog.peers_problem.text()
    dialog.peers.setPlainText(
        "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooWCNSLFe2PXo7dHyH8A27vxBMfKKuAJEa9rnvzwW5sLjEc"
    )
    assert dialog.save_button.isEnabled() and dialog.peers_problem.isHidden()
    dialog.swarm.setCurrentIndex(0)  # local: peers do not matter
    dialog.peers.setPlainText("garbage")
    assert dialog.save_button.isEnabled()
    dialog.memory.slider.setValue(50)
    assert dialog.memory.label.text() == "50 % of free RAM: about 8.0 GB of 16.0 GB"


def test_settings_create_and_join_private_swarms_by_invite(qtbot, app_dirs):
    from app.qt import QGuiApplication
    from app.windows.settings import SettingsDialog
    from contract.invites import make_invite

    peer = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooWCNSLFe2PXo7dHyH8A27vxBMfKKuAJEa9rnvzwW5sLjEc"
    ours = make_invite([peer])
    dialog = SettingsDialog(Settings(swarm="local"), invite=ours)
    qtbot.addWidget(dialog)
    panel = dialog.invites
    panel.copy_button.click()
    assert QGuiApplication.clipboard().text() == ours

    panel.pasted.setText("pollinate-invite-1.garbage!")
    panel.join_button.click()
    assert panel.problem.isVisibleTo(dialog) and "damaged" in panel.problem.text()
    assert dialog.result_settings().swarm == "local"  # nothing changed

    panel.pasted.setText(ours)
    panel.join_button.click()
    assert panel.problem.isHidden()
    joined = dialog.result_settings()
    assert (joined.swarm, joined.initial_peers) == ("private", (peer,))

    panel.create_button.click()
    created = dialog.result_settings()
    assert (created.swarm, created.initial_peers) == ("private", ())
    assert dialog.save_button.isEnabled()


def test_shareable_memory_follows_the_plan_else_the_hardware():
    from app.viewmodels.dashboard import shareable_memory

    GiB = 1024**3

    plan = {"budget_bytes": 6 * GiB, "memory_kind": "ram"}
    assert shareable_memory(None, plan, 0.5) == (12 * GiB, "RAM")
    assert shareable_memory(None, dict(plan, memory_kind="gpu"), 0.5) == (12 * GiB, "GPU memory")
    ram_only = {"gpus": [], "ram": {"available_bytes": 10 * GiB}}
    assert shareable_memory(ram_only, None, 0.5) == (8 * GiB, "RAM")  # CPU hosting may use 80 % of it
    assert shareable_memory({"gpus": [{"free_bytes": 20 * GiB}]}, None, 0.5) == (20 * GiB, "GPU memory")
    assert shareable_memory(None, None, 0.5) == (None, "memory")


def test_onboarding_slider_names_ram_or_gpu_memory_in_gb(qtbot, app_dirs, tmp_path, monkeypatch):
    """The walk: onboarding said "50 % of free memory": no GB, not which memory (no engine runs yet)."""
    import psutil

    from app.local_memory import probe_hardware
    from app.windows.onboarding import OnboardingDialog

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi: hosting would use the RAM
    dialog = OnboardingDialog.for_this_computer(Settings())
    qtbot.addWidget(dialog)
    text = dialog.memory.label.text()
    assert text.startswith("50 % of free RAM: about ") and text.endswith(" GB")
    shareable = float(text.rsplit(" of ", 1)[1].removesuffix(" GB")) * 2**30  # CPU hosting: 80 % of available
    assert abs(shareable - psutil.virtual_memory().available * 0.8) < 2**30
    assert probe_hardware()["gpus"] == []
    # An NVIDIA GPU (a real nvidia-smi stand-in on PATH): its free memory, named as GPU memory.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, NVIDIA GeForce RTX 4070, 10240, 12282'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    dialog = OnboardingDialog.for_this_computer(Settings(memory_fraction=0.5))
    qtbot.addWidget(dialog)
    assert dialog.memory.label.text() == "50 % of free GPU memory: about 5.0 GB of 10.0 GB"


def test_swarm_summary_counts_only_servers_that_serve():
    """The walk: after Stop sharing the map said 1 server per block but the sentence "3 server(s)" (our
    server stays in the DHT, announced offline, until its record expires)."""
    from app.windows.dashboard import swarm_summary

    swarm = {
        "model": "SmolLM2-135M-Instruct",
        "blocks": [{"index": 0, "servers": 1}, {"index": 1, "servers": 1}],
        "servers": [{"state": "online"}, {"state": "offline"}, {"state": "online"}],
    }
    assert swarm_summary(swarm).startswith("Swarm health for SmolLM2-135M-Instruct: 2 server(s); 1–1 ")


def test_nothing_offers_sharing_before_the_engine_said_how_it_is():
    """The walk, at relaunch: for a moment after the engine process ran, before its first status, the
    dashboard said "Not sharing. Turn on Share my GPU" with Share enabled, then "Joining the swarm…"."""
    from app.viewmodels.dashboard import DashboardSnapshot, share_control
    from app.windows.dashboard import headline

    class Model:
        snapshot = DashboardSnapshot(engine_state="running", status=None)

    control = share_control(Model.snapshot)
    assert not control.enabled and not control.checked and control.busy
    assert "Turn on" not in headline(Model) and "Share my GPU" not in headline(Model)


def test_settings_fit_a_laptop_screen_with_save_in_reach(qtbot, app_dirs):
    """The walk (a 1000 px tall screen): the Settings dialog was taller than the screen, its rows were
    squeezed (the "I am using this computer" row clipped); on a 768 px laptop Save was off the screen."""
    from app.qt import QScrollArea
    from app.windows.settings import SettingsDialog

    info = {"detectors": {d: {"unsupported": "not here"} for d in ("gpu", "user_idle", "gpu_temperature")}}
    dialog = SettingsDialog(Settings(), policy_info=info, invite="pollinate-invite-1." + "x" * 90)
    qtbot.addWidget(dialog)
    assert dialog.minimumSizeHint().height() <= 500
    scroll = dialog.findChild(QScrollArea)
    assert scroll is not None and scroll.isAncestorOf(dialog.polite)
    assert not scroll.isAncestorOf(dialog.save_button)  # Save and Cancel stay in view


def test_points_are_not_shown_as_zero_while_the_engine_is_in_no_swarm():
    """The walk: 7.5 points on the local demo read "0.0" (priority 1.00) while the engine could not join the
    public swarm, then 7.5 again back on the demo: points belong to a swarm, and there was none."""
    from app.viewmodels.dashboard import DashboardSnapshot, displayed_stats, with_stats

    snap = with_stats(DashboardSnapshot(engine_state="running"), {"points": 0.0, "priority": 1.0}, 10.0)
    snap = with_status(snap, {"state": "error", "ready": False, "message": "Cannot reach the public swarm."})
    stats = displayed_stats(snap, 11.0)
    assert stats["points"] is None and stats["priority"] is None
    snap = with_status(snap, {"state": "idle", "ready": True})
    assert displayed_stats(snap, 11.0)["points"] == 0.0


def test_the_uptime_clock_stops_while_the_engine_is_down():
    """The walk: after kill -9 the dashboard's uptime went on counting ("0m 19s") while no engine ran: no
    engine, no uptime."""
    from app.viewmodels.dashboard import DashboardSnapshot, displayed_stats

    snap = with_stats(DashboardSnapshot(engine_state="running"), {"uptime_seconds": 100.0}, 10.0)
    assert displayed_stats(snap, 15.0)["uptime_seconds"] == 105.0
    down = with_engine(snap, "restarting", "The engine stopped unexpectedly")
    assert displayed_stats(down, 15.0)["uptime_seconds"] is None
