"""AppController: composes engine process, API client, view models, windows and tray, and wires them."""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable

from app import autostart, paths
from app.api_client import ApiClient, ApiError, EventFeed, describe_error
from app.engine_backend import EngineBackend, default_backend
from app.engine_process import RESTARTING, RUNNING, EngineProcess, engine_args
from app.history import ChatHistory
from app.qt import QApplication, QMessageBox, QObject, Signal
from app.settings import POLICY_FIELDS, Settings, get_hf_token, save_settings, set_hf_token
from app.tray import Tray, state_icon
from app.viewmodels.chat import ChatModel, Sampling
from app.viewmodels.dashboard import DashboardModel, share_control, shareable_memory
from app.viewmodels.pause import PAUSE_HOUR_SECONDS, pause_actions, until_tomorrow
from app.viewmodels.status import tray_state, tray_tooltip
from contract import stores

log = logging.getLogger(__name__)

# Changing one of these needs a new engine process.
ENGINE_FIELDS = ("swarm", "initial_peers", "weights_dir")


class ErrorPresenter(QObject):
    """The one place that turns failures and engine news into words and shows them (status bar, tray)."""

    message = Signal(str, bool)  # text, is_error

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.last = ""

    def present(self, error: ApiError, doing: str = "") -> None:
        self.show(describe_error(error, doing), True)

    def show(self, text: str, is_error: bool = False) -> None:
        self.last = text
        log.info("%s", text)
        self.message.emit(text, is_error)


class AppController(QObject):
    """Owns everything the app shows; `start()` launches or attaches to the engine; `quit()` ends cleanly."""

    quitting = Signal()

    def __init__(
        self,
        settings: Settings,
        *,
        manage_engine: bool = True,
        engine_args: tuple[str, ...] = (),
        engine_command_factory: Callable[[], list[str]] | None = None,
        engine_backend: EngineBackend | None = None,
        use_system_tray: bool | None = None,
        parent: QObject | None = None,
    ):
        super().__init__(parent)
        from app.windows.dashboard import DashboardWindow

        self.settings = settings
        self.data_dir = paths.data_dir()
        self.engine_args = tuple(engine_args)
        self.confirm_quit = True
        self.quit_app: Callable[[], None] = QApplication.quit
        self.settings_dialog_open = None
        self.policy_info: dict | None = None  # the engine's /api/policy answer: which detectors work here
        self.presenter = ErrorPresenter(self)
        self.client = ApiClient(self)
        self.feed = EventFeed(self.client, self)
        self.engine = EngineProcess(
            self.data_dir,
            engine_command_factory or self._engine_command,
            env_factory=self._engine_env,
            manage=manage_engine,
            backend=engine_backend or default_backend(self.data_dir),
            parent=self,
        )
        self.dashboard_model = DashboardModel(self.client, self._hosting_options, self)
        self.history = ChatHistory(self.data_dir / "chat-history.sqlite3").open()
        self.chat_model = ChatModel(self.client, self.history, self)
        self.chat_model.sampling = Sampling(settings.temperature, settings.top_p, settings.max_tokens)
        self.chat_model.system_prompt = settings.system_prompt
        self.tray = Tray(self, use_system_tray=use_system_tray)
        self.dashboard = DashboardWindow(self.dashboard_model)
        self.dashboard.setWindowIcon(state_icon("app"))
        self.dashboard.hide_on_close = self.tray.available
        self._chat_window = None
        self._engine_was_running = False
        self.wsl_setup = None  # app.wsl_setup.WslSetup while the first run sets up WSL

        self.engine.endpoint_changed.connect(self.client.set_endpoint)
        self.engine.state_changed.connect(self._engine_state)
        self.engine.notice.connect(self.presenter.show)
        self.feed.status.connect(self.dashboard_model.on_status)
        self.feed.status.connect(self.chat_model.on_status)
        self.feed.stats.connect(self.dashboard_model.on_stats)
        self.feed.connected_changed.connect(lambda up: None if up else self.engine.check_alive())
        self.dashboard_model.changed.connect(self._update_tray)
        self.dashboard_model.error.connect(self.presenter.present)
        self.dashboard_model.sharing_requested.connect(self._remember_sharing)
        self.presenter.message.connect(self._show_message)
        self.tray.share_toggled.connect(self.dashboard_model.set_sharing)
        self.tray.pause_hour.connect(self.pause_hour)
        self.tray.pause_until_tomorrow.connect(self.pause_until_tomorrow)
        self.tray.resume.connect(self.dashboard_model.resume)
        self.dashboard.pause_hour_requested.connect(self.pause_hour)
        self.dashboard.pause_tomorrow_requested.connect(self.pause_until_tomorrow)
        self.dashboard.resume_requested.connect(self.dashboard_model.resume)
        self.tray.open_chat.connect(self.show_chat)
        self.tray.open_dashboard.connect(self.show_dashboard)
        self.tray.open_settings.connect(self.show_settings)
        self.tray.quit_requested.connect(self.quit)
        self.dashboard.close_requested.connect(self.quit)
        self.dashboard.open_chat_requested.connect(self.show_chat)
        self.dashboard.settings_requested.connect(self.show_settings)
        self.dashboard.retry_requested.connect(self.retry_swarm)
        self.dashboard.local_demo_requested.connect(self.use_local_demo)
        self._update_tray()

    # ---- engine

    def _engine_command(self) -> list[str]:
        # An engine not tied to the app outlives it: only when the user chose to keep sharing.
        args = engine_args(
            self.settings.swarm,
            self.settings.initial_peers if self.settings.swarm == "private" else (),
            self.engine_args,
        )
        return self.engine.backend.engine_command(args, tie_to_app=not self.settings.keep_sharing_on_close)

    def _engine_env(self) -> dict[str, str]:
        env = {}
        if self.settings.weights_dir:
            env["HF_HUB_CACHE"] = self.settings.weights_dir
        token = get_hf_token()
        if token:
            env["HF_TOKEN"] = token
        return env

    def _hosting_options(self) -> dict:
        return {
            "model": self.settings.host_model,
            "quant": self.settings.quant,
            "memory_fraction": self.settings.memory_fraction,
        }

    def start(self, show_window: bool = True) -> None:
        self.tray.show()
        if show_window or not self.tray.available:
            self.show_dashboard()
        self.engine.start()
        self.tell_set_aside()

    def tell_set_aside(self) -> None:
        """Tell the user, once, about every store found damaged and set aside (by the app or the engine)."""
        records = stores.pending(self.data_dir)
        if records:
            self.presenter.show(" ".join(record.message() for record in records), True)
            stores.acknowledge(self.data_dir, records)

    def _engine_state(self, state: str, message: str) -> None:
        self.dashboard_model.on_engine_state(state, message)
        self.chat_model.set_engine_ready(state == RUNNING, message if state != RUNNING else "")
        if state == RUNNING:
            self.feed.start()
            if self._engine_was_running:
                self.presenter.show("The engine restarted and is running again.")
            self._engine_was_running = True
            self.tell_set_aside()  # the engine checks its stores (ledger, state, models) as it starts
            self.send_policy()
            if self.settings.sharing_enabled:
                self.dashboard_model.set_sharing(True)  # resume: the user turned sharing on earlier
        elif state == "failed" and self._set_up_wsl():
            pass  # the engine's WSL distribution is missing: made now, with progress on the dashboard
        elif state == RESTARTING or state == "failed":
            self.presenter.show(message, True)
        self._update_tray()

    def _set_up_wsl(self) -> bool:
        """First run on Windows: create the engine's WSL distribution from the installer's payload."""
        backend = self.engine.backend
        if not getattr(backend, "missing_distribution", False) or self.wsl_setup is not None:
            return False
        from app.wsl_setup import WslSetup, find_payload

        payload = find_payload()
        if payload is None:
            return False
        self.wsl_setup = WslSetup(
            payload,
            self.data_dir / "wsl-distribution",
            self.data_dir / "logs" / "wsl-setup.log",
            wsl_exe=backend.config.wsl,
            distribution=backend.config.distribution,
            parent=self,
        )
        self.wsl_setup.progress.connect(lambda text: self.dashboard_model.on_engine_state("starting", text))
        self.wsl_setup.finished.connect(self._wsl_set_up)
        self.wsl_setup.start()
        return True

    def _wsl_set_up(self, ok: bool, message: str) -> None:
        if ok:
            self.presenter.show(message)
            self.engine.start()
        else:
            self.dashboard_model.on_engine_state("failed", message)
            self.presenter.show(message, True)

    def _remember_sharing(self, on: bool) -> None:
        if on != self.settings.sharing_enabled:
            self.apply_settings(dataclasses.replace(self.settings, sharing_enabled=on))

    def _update_tray(self) -> None:
        snap = self.dashboard_model.snapshot
        status = snap.status if self.engine.state == RUNNING else None
        self.tray.set_state(
            tray_state(self.engine.state, status),
            tray_tooltip(self.engine.state, self.engine.message, status),
        )
        control = share_control(snap)
        self.tray.set_sharing(control.checked, control.enabled, control.text)
        self.tray.set_pause_actions(*pause_actions(status))

    # ---- polite sharing

    def pause_hour(self) -> None:
        self.dashboard_model.pause(seconds=PAUSE_HOUR_SECONDS)

    def pause_until_tomorrow(self) -> None:
        self.dashboard_model.pause(until=until_tomorrow(datetime.datetime.now()))

    def send_policy(self) -> None:
        """Tell the engine what pauses sharing (the Settings' policies); it keeps them across its restarts."""
        call = self.client.put("/api/policy", self.settings.policy())
        call.succeeded.connect(lambda info: setattr(self, "policy_info", info))
        call.failed.connect(lambda err: self.presenter.present(err, "apply the sharing policies"))

    def _show_message(self, text: str, is_error: bool) -> None:
        self.dashboard.show_message(text, 0 if is_error else 10_000)
        if not self.dashboard.isVisible():
            self.tray.notify("Pollinate", text, is_error)

    # ---- windows

    def show_dashboard(self) -> None:
        self.dashboard.show()
        self.dashboard.raise_()
        self.dashboard.activateWindow()

    @property
    def chat_window(self):
        if self._chat_window is None:
            from app.windows.chat import ChatWindow

            self._chat_window = ChatWindow(self.chat_model)
            self._chat_window.setWindowIcon(state_icon("app"))
            conversations = self.history.conversations()
            if conversations and self.chat_model.conversation_id is None:
                self.chat_model.open_conversation(conversations[0].id)
        return self._chat_window

    def show_chat(self) -> None:
        window = self.chat_window
        window.show()
        window.raise_()
        window.activateWindow()

    def settings_dialog(self):
        from app.windows.settings import SettingsDialog

        snapshot = self.dashboard_model.snapshot
        # The same figures as the dashboard's plan: GPU memory or RAM, and what the share is taken of.
        free, name = shareable_memory(snapshot.hardware, snapshot.plan, self.settings.memory_fraction)
        return SettingsDialog(
            self.settings,
            hf_token_set=get_hf_token() is not None,
            free_bytes=free,
            memory_name=name,
            policy_info=self.policy_info,
            invite=(self.dashboard_model.snapshot.status or {}).get("invite"),
            parent=self.dashboard,
        )

    def show_settings(self) -> None:
        dialog = self.settings_dialog()
        self.settings_dialog_open = dialog
        dialog.accepted.connect(
            lambda: self.apply_settings(dialog.result_settings(), dialog.hf_token_change())
        )
        dialog.open()

    def apply_settings(self, new: Settings, hf_token: str | None = None) -> None:
        """Save new settings and carry them out: autostart entry, keyring, engine restart when needed."""
        old, self.settings = self.settings, new
        save_settings(new)
        if new.autostart != old.autostart or new.autostart != autostart.is_enabled():
            try:
                autostart.set_enabled(new.autostart)
            except OSError as exc:
                self.presenter.show(f"Could not change start at login: {exc}", True)
        token_changed = hf_token is not None
        if token_changed and not set_hf_token(hf_token):
            self.presenter.show(
                "Could not store the Hugging Face token: no system keyring is available.", True
            )
        if any(getattr(new, f) != getattr(old, f) for f in POLICY_FIELDS) and self.engine.state == RUNNING:
            self.send_policy()
        restart = token_changed or any(getattr(new, f) != getattr(old, f) for f in ENGINE_FIELDS)
        plan_fields = ("quant", "memory_fraction", "host_model")
        if not restart and any(getattr(new, f) != getattr(old, f) for f in plan_fields):
            self.dashboard_model.refresh_plan()  # the plan follows the chosen quantization and memory share
        if not restart and new.memory_fraction != old.memory_fraction and self.engine.state == RUNNING:
            self.dashboard_model.set_memory_share(new.memory_fraction)  # hosting resizes without a restart
        hosting = (self.dashboard_model.snapshot.status or {}).get("state") in ("loading", "serving")
        if new.keep_sharing_on_close != old.keep_sharing_on_close and not hosting:
            restart = True  # --parent-pid is given at start, so the choice needs a new engine
        if restart and self.engine.manage and self.engine.state != "stopped":
            self.presenter.show("Settings changed: restarting the engine.")
            self.engine.restart()

    def retry_swarm(self) -> None:
        """Try joining the swarm again (the engine joins once, as it starts)."""
        if self.engine.manage:
            self.presenter.show("Joining the swarm again…")
            self.engine.restart()

    def use_local_demo(self) -> None:
        """Switch to the local demo swarm: works without internet."""
        self.apply_settings(dataclasses.replace(self.settings, swarm="local"))

    # ---- quitting

    def quit_plan(self) -> str:
        """'keep' to leave the engine sharing in the background, else 'stop'."""
        hosting = (self.dashboard_model.snapshot.status or {}).get("state") in ("loading", "serving")
        return "keep" if self.settings.keep_sharing_on_close and hosting and self.engine.manage else "stop"

    def quit_text(self) -> str:
        if self.quit_plan() == "keep":
            return (
                "Pollinate will keep sharing your GPU in the background after you quit. Open the app again "
                "to stop sharing. (Change this in Settings.)"
            )
        hosting = (self.dashboard_model.snapshot.status or {}).get("state") in ("loading", "serving")
        if hosting:
            return (
                "Quitting stops sharing your GPU and stops the engine. Sharing stays off when you open "
                "Pollinate again, until you turn it on."
            )
        return "Quitting stops the engine." if self.engine.manage else "Quit Pollinate?"

    def quit(self) -> None:
        if self.confirm_quit:
            answer = QMessageBox.question(self.dashboard, "Quit Pollinate", self.quit_text())
            if answer != QMessageBox.StandardButton.Yes:
                return
        self.shutdown()
        self.quit_app()

    def shutdown(self) -> None:
        """Stop or detach the engine, close history and windows; no engine is left behind unless kept."""
        self.quitting.emit()
        # Out of sight first: stopping the engine (it announces OFFLINE, ends its peers) takes seconds.
        self.tray.hide()
        for window in (self.dashboard, self._chat_window):
            if window is not None:
                window.hide()
        QApplication.processEvents()
        self.chat_model.stop()
        self.feed.stop()
        if self.wsl_setup is not None and self.wsl_setup.running:
            self.wsl_setup.cancel()
        if self.quit_plan() == "keep":
            self.engine.detach()
        else:
            # As the Quit dialog says: sharing stays off at the next start. (Sharing still resumes after a
            # restart the user did not choose, e.g. a reboot with the app running.)
            if self.settings.sharing_enabled:
                self.settings = dataclasses.replace(self.settings, sharing_enabled=False)
                save_settings(self.settings)
            self.engine.stop()
        self.history.close()
