"""Tray icon and menu: state icon, Share my GPU, Pause for 1 hour / until tomorrow / Resume, Open chat,
Dashboard, Settings, Quit.

Where no system tray exists (e.g. offscreen or some Linux desktops) the menu still exists, and the dashboard
window stands in for the tray (the controller shows it and makes closing it quit the app).
"""

from __future__ import annotations

from app import paths
from app.qt import QAction, QIcon, QMenu, QObject, QSystemTrayIcon, Signal
from app.viewmodels.status import TRAY_STATES

_icons: dict[str, QIcon] = {}


def state_icon(state: str) -> QIcon:
    """The icon for a tray state (idle, loading, serving, paused, error), or the app icon for "app"."""
    name = "pollinate" if state == "app" else f"tray-{state}"
    if name not in _icons:
        _icons[name] = QIcon(str(paths.resource_path(f"{name}.svg")))
    return _icons[name]


class Tray(QObject):
    """The tray icon and its menu; it only forwards the user's choices as signals."""

    share_toggled = Signal(bool)
    pause_hour = Signal()
    pause_until_tomorrow = Signal()
    resume = Signal()
    open_chat = Signal()
    open_dashboard = Signal()
    open_settings = Signal()
    quit_requested = Signal()

    def __init__(self, parent: QObject | None = None, *, use_system_tray: bool | None = None):
        super().__init__(parent)
        self.available = (
            QSystemTrayIcon.isSystemTrayAvailable() if use_system_tray is None else use_system_tray
        )
        self.state = "idle"
        self.menu = QMenu()
        self.share_action = QAction("Share my GPU", self.menu)
        self.share_action.setCheckable(True)
        self.share_action.triggered.connect(self._share_triggered)
        self.pause_hour_action = QAction("Pause for 1 hour", self.menu)
        self.pause_hour_action.triggered.connect(lambda: self.pause_hour.emit())
        self.pause_tomorrow_action = QAction("Pause until tomorrow", self.menu)
        self.pause_tomorrow_action.triggered.connect(lambda: self.pause_until_tomorrow.emit())
        self.resume_action = QAction("Resume sharing", self.menu)
        self.resume_action.triggered.connect(lambda: self.resume.emit())
        self.chat_action = QAction("Open chat", self.menu)
        self.chat_action.triggered.connect(lambda: self.open_chat.emit())
        self.dashboard_action = QAction("Dashboard", self.menu)
        self.dashboard_action.triggered.connect(lambda: self.open_dashboard.emit())
        self.settings_action = QAction("Settings…", self.menu)
        self.settings_action.triggered.connect(lambda: self.open_settings.emit())
        self.quit_action = QAction("Quit", self.menu)
        self.quit_action.triggered.connect(lambda: self.quit_requested.emit())
        self.status_action = QAction("Starting…", self.menu)
        self.status_action.setEnabled(False)
        self.menu.addAction(self.status_action)
        self.menu.addSeparator()
        for action in (
            self.share_action,
            self.pause_hour_action,
            self.pause_tomorrow_action,
            self.resume_action,
        ):
            self.menu.addAction(action)
        self.menu.addSeparator()
        for action in (self.chat_action, self.dashboard_action, self.settings_action):
            self.menu.addAction(action)
        self.menu.addSeparator()
        self.menu.addAction(self.quit_action)
        self.icon: QSystemTrayIcon | None = None
        if self.available:
            self.icon = QSystemTrayIcon(state_icon("idle"), self)
            self.icon.setContextMenu(self.menu)
            self.icon.activated.connect(self._activated)

    def _share_triggered(self) -> None:
        self.share_toggled.emit(self.share_action.isChecked())

    def show(self) -> None:
        if self.icon is not None:
            self.icon.show()

    def hide(self) -> None:
        if self.icon is not None:
            self.icon.hide()

    def _activated(self, reason) -> None:
        if reason in (QSystemTrayIcon.ActivationReason.Trigger, QSystemTrayIcon.ActivationReason.DoubleClick):
            self.open_dashboard.emit()

    def set_state(self, state: str, tooltip: str) -> None:
        assert state in TRAY_STATES, state
        self.state = state
        self.status_action.setText(tooltip.splitlines()[0].removeprefix("Pollinate: ").capitalize())
        if self.icon is not None:
            self.icon.setIcon(state_icon(state))
            self.icon.setToolTip(tooltip)

    def set_sharing(self, checked: bool, enabled: bool, text: str = "Share my GPU") -> None:
        self.share_action.setChecked(checked)
        self.share_action.setEnabled(enabled)
        self.share_action.setText(text)

    def set_pause_actions(self, can_pause: bool, can_resume: bool) -> None:
        """Pause while serving; Resume while the user's own pause runs (a policy's pause ends by itself)."""
        self.pause_hour_action.setVisible(not can_resume)
        self.pause_tomorrow_action.setVisible(not can_resume)
        self.pause_hour_action.setEnabled(can_pause)
        self.pause_tomorrow_action.setEnabled(can_pause)
        self.resume_action.setVisible(can_resume)

    def notify(self, title: str, text: str, error: bool = False) -> bool:
        """A balloon message; False where there is no tray to show it."""
        if self.icon is None or not self.icon.isVisible():
            return False
        kind = QSystemTrayIcon.MessageIcon.Warning if error else QSystemTrayIcon.MessageIcon.Information
        self.icon.showMessage(title, text, kind, 8000)
        return True
