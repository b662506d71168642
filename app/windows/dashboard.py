"""Dashboard window: hardware, hosting plan over the block coverage, Share toggle, stats, swarm health."""

from __future__ import annotations

import time

from app.qt import (
    QCloseEvent,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    Qt,
    QTabWidget,
    QTimer,
    QVBoxLayout,
    QWidget,
    Signal,
)
from app.viewmodels.dashboard import (
    DashboardModel,
    coverage,
    displayed_stats,
    format_duration,
    hardware_lines,
    join_failed,
    plan_text,
    planned_blocks,
    rate_series,
    share_control,
    swarm_note,
)
from app.viewmodels.pause import is_paused, pause_actions, pause_text
from app.viewmodels.status import move_text
from app.viewmodels.swarm_health import reachability_text
from app.windows.swarm_health import SwarmHealthView
from app.windows.widgets import BlockMap, TimePlot

# Served work and sharing time add up over every run of the engine (kept by the engine; never go back).
STAT_FIELDS = (
    ("lifetime_tokens_served", "Tokens served", lambda v: f"{int(v or 0):,}"),
    ("lifetime_requests_served", "Requests served", lambda v: f"{int(v or 0):,}"),
    ("uptime_seconds", "Uptime", format_duration),
    ("lifetime_hosting_seconds", "Time sharing", format_duration),
    ("sessions_active", "Active sessions", lambda v: f"{int(v or 0)}"),
    ("points", "Points", lambda v: f"{float(v or 0):,.1f}"),
    ("priority", "Priority", lambda v: f"{float(v or 0):.2f}"),
)
# What a number means where it is not obvious (points stay 0 while only your own chats use your blocks).
STAT_HINTS = {
    "lifetime_tokens_served": "Tokens your blocks processed for anyone (your own chats too), over every run.",
    "points": "Earned when other peers use your blocks (your own chats earn none) and for time online; "
    "they fade over days. Other servers serve busy queues by these points.",
    "priority": "How far ahead of others your requests are queued on busy servers, from your points.",
}


def headline(model: DashboardModel) -> str:
    snap = model.snapshot
    if snap.engine_state != "running":
        return snap.engine_message or "The engine is not running."
    if snap.status is None:
        return "Connecting to the engine…"
    status = snap.status
    state = status.get("state", "idle")
    if join_failed(snap):  # not a hosting failure: the user may never have asked to host
        return status.get("message") or "The engine could not join the swarm."
    if status.get("ready") is False and state == "idle" and status.get("message"):
        return status["message"]  # e.g. joining the swarm, preparing the demo model (first start)
    moving = move_text(status)
    if moving:
        return moving
    if state == "serving" and status.get("blocks"):
        start, end = status["blocks"]
        return f"Sharing: serving blocks {start}–{end - 1} of {status.get('model')}"
    if state == "loading":
        return status.get("message") or "Loading blocks…"
    if is_paused(status):
        return pause_text(status)
    if state == "draining":
        return "Stopping: letting running sessions finish…"
    if state == "error":
        return f"Hosting failed: {status.get('message') or 'unknown error'}"
    return "Not sharing. Turn on Share my GPU to host part of the model for the swarm."


class DashboardWindow(QMainWindow):
    """Shows a DashboardModel; the Share button calls model.set_sharing. Closing hides it (the tray stays)."""

    close_requested = Signal()
    open_chat_requested = Signal()
    settings_requested = Signal()
    retry_requested = Signal()  # join the swarm again (restart the engine)
    pause_hour_requested = Signal()
    pause_tomorrow_requested = Signal()
    resume_requested = Signal()
    local_demo_requested = Signal()  # switch to the local demo swarm

    def __init__(self, model: DashboardModel, parent: QWidget | None = None):
        super().__init__(parent)
        self.model = model
        self.hide_on_close = True
        self.setWindowTitle("Pollinate — Dashboard")
        self.resize(760, 720)
        central = QWidget()
        layout = QVBoxLayout(central)

        top = QHBoxLayout()
        self.headline = QLabel()
        self.headline.setWordWrap(True)
        # Selectable: advice such as the command that installs WSL can be copied from it.
        self.headline.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        font = self.headline.font()
        font.setPointSizeF(font.pointSizeF() * 1.15)
        font.setBold(True)
        self.headline.setFont(font)
        self.share_button = QPushButton("Share my GPU")
        self.share_button.setCheckable(True)
        self.share_button.setMinimumWidth(200)
        self.share_button.setMinimumHeight(36)
        self.share_button.clicked.connect(self._share_clicked)
        self.share_button.setStyleSheet(
            "QPushButton { background: #f5b700; color: #3b2a00; font-weight: bold; border-radius: 5px;"
            " padding: 6px 16px; border: 1px solid #a87b00; }"
            "QPushButton:checked { background: #2fb35a; color: white; border-color: #1b7a3a; }"
            "QPushButton:disabled { background: #d5d8dc; color: #7a828a; border-color: #b0b6bc; }"
        )
        # Chat and settings are reachable from here too: some desktops have no system tray.
        self.chat_button = QPushButton("Open chat")
        self.chat_button.setMinimumHeight(36)
        self.chat_button.clicked.connect(self.open_chat_requested)
        self.settings_button = QPushButton("Settings…")
        self.settings_button.setMinimumHeight(36)
        self.settings_button.clicked.connect(self.settings_requested)
        top.addWidget(self.headline, 1)
        top.addWidget(self.chat_button)
        top.addWidget(self.settings_button)
        top.addWidget(self.share_button)
        layout.addLayout(top)
        # When the engine cannot join its swarm: the two ways forward, next to the one-sentence reason.
        recovery = QHBoxLayout()
        self.retry_button = QPushButton("Retry")
        self.retry_button.clicked.connect(self.retry_requested)
        self.local_demo_button = QPushButton("Use the local demo")
        self.local_demo_button.setToolTip("Switch to the demo swarm on this computer (works offline)")
        self.local_demo_button.clicked.connect(self.local_demo_requested)
        recovery.addStretch(1)
        recovery.addWidget(self.retry_button)
        recovery.addWidget(self.local_demo_button)
        layout.addLayout(recovery)
        # Pausing: for an hour, until tomorrow, or resume the user's own pause.
        pause_row = QHBoxLayout()
        self.pause_label = QLabel()  # why sharing is paused and until when
        self.pause_label.setWordWrap(True)
        self.pause_label.setStyleSheet("color: #8a5a00;")
        self.pause_hour_button = QPushButton("Pause for 1 hour")
        self.pause_hour_button.clicked.connect(self.pause_hour_requested)
        self.pause_tomorrow_button = QPushButton("Pause until tomorrow")
        self.pause_tomorrow_button.clicked.connect(self.pause_tomorrow_requested)
        self.resume_button = QPushButton("Resume sharing")
        self.resume_button.clicked.connect(self.resume_requested)
        pause_row.addWidget(self.pause_label, 1)
        for button in (self.pause_hour_button, self.pause_tomorrow_button, self.resume_button):
            pause_row.addWidget(button)
        layout.addLayout(pause_row)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setFormat("%p%")
        layout.addWidget(self.progress)
        self.reachability_label = QLabel()  # only while hosting, once the dial-back check has answered
        self.reachability_label.setWordWrap(True)
        layout.addWidget(self.reachability_label)

        hardware_box = QGroupBox("Your hardware")
        self.hardware_label = QLabel()
        self.hardware_label.setWordWrap(True)
        QVBoxLayout(hardware_box).addWidget(self.hardware_label)
        layout.addWidget(hardware_box)

        plan_box = QGroupBox("Hosting plan and swarm coverage")
        plan_layout = QVBoxLayout(plan_box)
        self.plan_label = QLabel()
        self.plan_label.setWordWrap(True)
        self.block_map = BlockMap()
        legend = QLabel(
            "Each tile is one block; the number is how many servers hold it. "
            "<span style='color:#e0413a'>■</span> none  <span style='color:#e0a800'>■</span> one  "
            "<span style='color:#2fb35a'>■</span> several  "
            "<span style='color:#1f6fd1'>▢</span> hosted by you  "
            "┄ planned for you"
        )
        legend.setWordWrap(True)
        self.swarm_label = QLabel()
        self.swarm_label.setWordWrap(True)
        for widget in (self.plan_label, self.block_map, legend, self.swarm_label):
            plan_layout.addWidget(widget)
        layout.addWidget(plan_box)

        stats_box = QWidget()  # the tab names it
        stats_layout = QVBoxLayout(stats_box)
        grid = QGridLayout()
        self.stat_labels: dict[str, QLabel] = {}
        for i, (key, title, _fmt) in enumerate(STAT_FIELDS):
            name = QLabel(title)
            name.setStyleSheet("color: #5d6670;")
            value = QLabel("—")
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            bold = value.font()
            bold.setBold(True)
            value.setFont(bold)
            for label in (name, value):
                label.setToolTip(STAT_HINTS.get(key, ""))
            grid.addWidget(name, 0, i)
            grid.addWidget(value, 1, i)
            self.stat_labels[key] = value
        stats_layout.addLayout(grid)
        self.plot = TimePlot("Tokens served per second", "tok/s")
        self.plot.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        stats_layout.addWidget(self.plot)
        # Your contribution and the swarm's servers share the space below (the swarm table can be long).
        self.tabs = QTabWidget()
        self.tabs.addTab(stats_box, "Your contribution")
        self.swarm_view = SwarmHealthView()
        self.tabs.addTab(self.swarm_view, "Swarm")
        layout.addWidget(self.tabs, 1)

        self.setCentralWidget(central)
        self.statusBar()
        model.changed.connect(self.refresh)
        # Clocks (uptime, sharing time) and the plot move on between stats events.
        self._clock = QTimer(self)
        self._clock.setInterval(1000)
        self._clock.timeout.connect(self._refresh_stats)
        self._clock.start()
        self.refresh()

    def _share_clicked(self, checked: bool) -> None:
        self.model.set_sharing(checked)
        self.refresh()

    def show_message(self, text: str, timeout_ms: int = 0) -> None:
        self.statusBar().showMessage(text, timeout_ms)

    def refresh(self) -> None:
        snap = self.model.snapshot
        self.headline.setText(headline(self.model))
        stuck = join_failed(snap)
        self.retry_button.setVisible(stuck)
        self.local_demo_button.setVisible(stuck and (snap.status or {}).get("swarm") != "local")
        running = snap.engine_state == "running"
        self.pause_label.setText(pause_text(snap.status) if running else "")
        self.pause_label.setVisible(running and is_paused(snap.status))
        can_pause, can_resume = pause_actions(snap.status) if running else (False, False)
        for button in (self.pause_hour_button, self.pause_tomorrow_button):
            button.setVisible(not can_resume)
            button.setEnabled(can_pause)
        self.resume_button.setVisible(can_resume)
        control = share_control(snap)
        self.share_button.setText(control.text)
        self.share_button.setChecked(control.checked)
        self.share_button.setEnabled(control.enabled)
        self.progress.setVisible(control.progress is not None)
        if control.progress is not None:
            self.progress.setValue(int(control.progress * 1000))
        reach = reachability_text(snap.status) if snap.engine_state == "running" else ""
        self.reachability_label.setText(reach)
        self.reachability_label.setVisible(bool(reach))
        state = ((snap.status or {}).get("reachability") or {}).get("state")
        warn = state in ("unreachable", "relayed")
        self.reachability_label.setStyleSheet("color: #b3261e;" if warn else "color: #1b7a3a;")
        self.hardware_label.setText("\n".join(hardware_lines(snap.hardware)))
        self.plan_label.setText(plan_text(snap.plan))
        self.block_map.set_cells(coverage(snap), planned_blocks(snap), swarm_note(snap))
        self.swarm_label.setText(swarm_note(snap) or swarm_summary(snap.swarm))
        self.swarm_view.show_swarm(snap.swarm)
        self._refresh_stats()
        if snap.error:
            self.show_message(snap.error)

    def _refresh_stats(self) -> None:
        snap, now = self.model.snapshot, time.time()
        stats = displayed_stats(snap, now)
        for key, _title, fmt in STAT_FIELDS:
            value = stats.get(key) if stats else None
            self.stat_labels[key].setText("—" if value is None else fmt(value))
        self.plot.set_points(rate_series(snap.history), now)

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.hide_on_close:
            event.ignore()
            self.hide()
        else:
            event.ignore()
            self.close_requested.emit()


def swarm_summary(swarm: dict | None) -> str:
    """Swarm health in a sentence: servers, servers per block, blocks nobody serves."""
    if not swarm:
        return "Swarm health: unknown."
    blocks = swarm.get("blocks") or []
    counts = [int(b.get("servers") or 0) for b in blocks]
    # A server that stopped stays in the DHT, announced offline, until its record expires: not counted.
    servers = sum(1 for server in swarm.get("servers") or [] if server.get("state") != "offline")
    missing = swarm.get("missing_blocks") or [b["index"] for b in blocks if not b.get("servers")]
    text = f"Swarm health for {swarm.get('model')}: "
    if servers:
        text += f"{servers} server(s); "
    if counts:
        text += f"{min(counts)}–{max(counts)} servers per block"
    if missing:
        shown = ", ".join(str(i) for i in missing[:16]) + ("…" if len(missing) > 16 else "")
        text += (
            f"; no server for block(s) {shown}: chat with this model cannot work until someone hosts them."
        )
    else:
        text += "; every block is served."
    return text
