"""Settings dialog: swarm, hosting memory and quantization, quit behaviour, autostart, HF token, folders."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from app import paths
from app.qt import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    Qt,
    QVBoxLayout,
    QWidget,
)
from app.settings import QUANTS, SWARM_LABELS, SWARMS, Settings
from app.viewmodels.dashboard import format_bytes
from app.windows.invites import InvitePanel
from contract import peer_address_problem

QUANT_LABELS = {
    "auto": "Automatic (nf4 on NVIDIA GPUs)",
    "none": "None (full precision, most memory)",
    "int8": "int8 (half the memory)",
    "nf4": "nf4 (a quarter of the memory)",
}


def free_space(path: Path) -> str:
    """'123.4 GB free' for the disk holding path (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{format_bytes(shutil.disk_usage(path).free)} free"
    except OSError:
        return "free space unknown"


class MemorySlider(QWidget):
    """A percentage slider (5–95 %) and a label saying which memory it shares (GPU memory or RAM) and how
    much that is in GB, when the hardware is known."""

    def __init__(
        self,
        fraction: float,
        free_bytes: int | None = None,
        parent: QWidget | None = None,
        memory_name: str = "memory",
    ):
        super().__init__(parent)
        self.free_bytes = free_bytes
        self.memory_name = memory_name
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(5, 95)
        self.slider.setValue(round(fraction * 100))
        self.label = QLabel()
        self.label.setMinimumWidth(220)
        self.slider.valueChanged.connect(self._update)
        layout.addWidget(self.slider, 1)
        layout.addWidget(self.label)
        self._update()

    def fraction(self) -> float:
        return self.slider.value() / 100

    def _update(self) -> None:
        text = f"{self.slider.value()} % of free {self.memory_name}"
        if self.free_bytes:
            shared = format_bytes(self.free_bytes * self.fraction())
            text += f": about {shared} of {format_bytes(self.free_bytes)}"
        self.label.setText(text)


class SettingsDialog(QDialog):
    """Edits a copy of Settings; `result_settings()` and `hf_token_change()` read the outcome after accept."""

    def __init__(
        self,
        settings: Settings,
        *,
        hf_token_set: bool = False,
        free_bytes: int | None = None,
        memory_name: str = "memory",
        policy_info: dict | None = None,
        invite: str | None = None,
        parent: QWidget | None = None,
    ):
        super().__init__(parent)
        self.setWindowTitle("Pollinate — Settings")
        self.settings = settings
        self._clear_token = False
        outer = QVBoxLayout(self)
        content = QWidget()  # scrolls when the screen is shorter than the dialog; Save/Cancel stay in view
        layout = QVBoxLayout(content)
        form = QFormLayout()
        layout.addLayout(form)

        self.swarm = QComboBox()
        for swarm in SWARMS:
            self.swarm.addItem(SWARM_LABELS[swarm], swarm)
        self.swarm.setCurrentIndex(SWARMS.index(settings.swarm))
        self.peers = QPlainTextEdit("\n".join(settings.initial_peers))
        self.peers.setPlaceholderText(
            "/ip4/203.0.113.5/tcp/31337/p2p/Qm… (one multiaddress per line; none: start a new private swarm)"
        )
        self.peers.setMaximumHeight(60)
        self.swarm.currentIndexChanged.connect(self._swarm_changed)
        self.peers.textChanged.connect(self._check_peers)
        self.peers_problem = QLabel()  # what is wrong with the peers, checked as they are typed
        self.peers_problem.setWordWrap(True)
        self.peers_problem.setStyleSheet("color: #b3261e;")
        form.addRow("Swarm", self.swarm)
        form.addRow("Private peers", self.peers)
        form.addRow("", self.peers_problem)
        self.invites = InvitePanel(invite)
        self.invites.create_requested.connect(self._create_private_swarm)
        self.invites.join_requested.connect(self._join_private_swarm)
        form.addRow("Invites", self.invites)

        self.memory = MemorySlider(settings.memory_fraction, free_bytes, memory_name=memory_name)
        form.addRow("Memory for hosting", self.memory)
        self.quant = QComboBox()
        for quant in QUANTS:
            self.quant.addItem(QUANT_LABELS[quant], quant)
        self.quant.setCurrentIndex(QUANTS.index(settings.quant))
        form.addRow("Quantization", self.quant)
        self.host_model = QLineEdit(settings.host_model)
        self.host_model.setPlaceholderText("Automatic (the engine's default for this swarm)")
        form.addRow("Model to host", self.host_model)

        self.keep_sharing = QCheckBox("Keep sharing in the background when I quit the app")
        self.keep_sharing.setChecked(settings.keep_sharing_on_close)
        self.autostart = QCheckBox("Start Pollinate when I log in")
        self.autostart.setChecked(settings.autostart)
        form.addRow("", self.keep_sharing)
        form.addRow("", self.autostart)

        token_row = QHBoxLayout()
        self.hf_token = QLineEdit()
        self.hf_token.setEchoMode(QLineEdit.EchoMode.Password)
        self.hf_token.setPlaceholderText(
            "Saved in the system keyring" if hf_token_set else "hf_… (for gated models)"
        )
        self.clear_token = QPushButton("Forget")
        self.clear_token.setEnabled(hf_token_set)
        self.clear_token.clicked.connect(self._forget_token)
        token_row.addWidget(self.hf_token, 1)
        token_row.addWidget(self.clear_token)
        form.addRow("Hugging Face token", token_row)

        data = paths.data_dir()
        self.data_label = QLabel(f"{data}  ({free_space(data)})")
        self.data_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form.addRow("Data folder", self.data_label)
        weights_row = QHBoxLayout()
        self.weights_dir = QLineEdit(settings.weights_dir)
        self.weights_dir.setPlaceholderText(str(paths.huggingface_cache_dir()))
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.weights_free = QLabel()
        self.weights_dir.textChanged.connect(self._update_weights_free)
        weights_row.addWidget(self.weights_dir, 1)
        weights_row.addWidget(browse)
        form.addRow("Model weights folder", weights_row)
        form.addRow("", self.weights_free)
        self.polite = PoliteSettings(settings, policy_info)
        layout.addWidget(self.polite)
        note = QLabel("Changing the swarm, peers, token or weights folder restarts the engine.")
        note.setWordWrap(True)
        layout.addWidget(note)

        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        self.save_button = buttons.button(QDialogButtonBox.StandardButton.Save)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(content)
        outer.addWidget(scroll, 1)
        outer.addWidget(buttons)
        self._fit_to_screen(content)
        self._swarm_changed()
        self._update_weights_free()

    def _fit_to_screen(self, content: QWidget) -> None:
        """As tall as the content, but no taller than the screen (the rest scrolls)."""
        wanted = content.sizeHint()
        screen = self.screen().availableGeometry() if self.screen() else None
        height = wanted.height() + 60  # the buttons and margins
        if screen is not None:
            height = min(height, int(screen.height() * 0.9))
        self.resize(wanted.width() + 40, height)

    def _swarm_changed(self) -> None:
        self.peers.setEnabled(self.swarm.currentData() == "private")
        self._check_peers()

    def peers_problem_text(self) -> str:
        """Why the private peers cannot be used ("" when they can, or when the swarm is not private)."""
        if self.swarm.currentData() != "private":
            return ""
        lines = [line.strip() for line in self.peers.toPlainText().splitlines() if line.strip()]
        problems = [problem for line in lines if (problem := peer_address_problem(line))]
        return problems[0] if problems else ""

    def _create_private_swarm(self) -> None:
        """No peers: the engine starts a new private swarm and shows its invite here."""
        self.swarm.setCurrentIndex(SWARMS.index("private"))
        self.peers.setPlainText("")

    def _join_private_swarm(self, addresses: tuple) -> None:
        self.swarm.setCurrentIndex(SWARMS.index("private"))
        self.peers.setPlainText("\n".join(addresses))

    def _check_peers(self) -> None:
        problem = self.peers_problem_text()
        self.peers_problem.setText(problem)
        self.peers_problem.setVisible(bool(problem))
        self.save_button.setEnabled(not problem)

    def _forget_token(self) -> None:
        self._clear_token = True
        self.hf_token.clear()
        self.hf_token.setPlaceholderText("Will be removed from the keyring")
        self.clear_token.setEnabled(False)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model weights folder", self.weights_dir.text())
        if folder:
            self.weights_dir.setText(folder)

    def _update_weights_free(self) -> None:
        folder = self.weights_dir.text().strip() or str(paths.huggingface_cache_dir())
        self.weights_free.setText(free_space(Path(folder)))

    def result_settings(self) -> Settings:
        return dataclasses.replace(
            self.settings,
            swarm=self.swarm.currentData(),
            initial_peers=tuple(
                line.strip() for line in self.peers.toPlainText().splitlines() if line.strip()
            ),
            memory_fraction=self.memory.fraction(),
            quant=self.quant.currentData(),
            host_model=self.host_model.text().strip(),
            keep_sharing_on_close=self.keep_sharing.isChecked(),
            autostart=self.autostart.isChecked(),
            weights_dir=self.weights_dir.text().strip(),
            **self.polite.values(),
        ).validated()

    def hf_token_change(self) -> str | None:
        """A new token, "" to delete the stored one, or None for no change."""
        if self.hf_token.text().strip():
            return self.hf_token.text().strip()
        return "" if self._clear_token else None


# The detector behind each policy (engine/polite), to say "unsupported here" next to the policy.
POLICY_DETECTORS = {
    "fullscreen": "fullscreen",
    "gpu_busy": "gpu",
    "cpu_busy": "cpu",
    "user_active": "user_idle",
    "battery": "battery",
    "temperature": "gpu_temperature",
}


def unsupported_text(policy_info: dict | None, detector: str) -> str:
    """'Unsupported here: <why>' for a detector the engine cannot run on this machine, else ''."""
    why = ((policy_info or {}).get("detectors") or {}).get(detector, {}).get("unsupported")
    return f"Unsupported here: {why}" if why else ""


class PoliteSettings(QGroupBox):
    """When sharing steps aside (the engine's politeness policies), and how much it may use while active."""

    def __init__(self, settings: Settings, policy_info: dict | None = None, parent: QWidget | None = None):
        super().__init__("Polite sharing: pause when…", parent)
        form = QFormLayout(self)
        self.unsupported: dict[str, QLabel] = {}

        def row(label: str, widget: QWidget, policy: str | None = None) -> None:
            form.addRow(label, widget)
            if policy is not None:
                note = QLabel(unsupported_text(policy_info, POLICY_DETECTORS[policy]))
                note.setWordWrap(True)
                note.setStyleSheet("color: #8a5a00;")
                note.setVisible(bool(note.text()))
                self.unsupported[policy] = note
                form.addRow("", note)

        self.fullscreen = QCheckBox("a game or any full-screen app is in front")
        self.fullscreen.setChecked(settings.pause_on_fullscreen)
        row("", self.fullscreen, "fullscreen")
        self.exclusive = QLineEdit(", ".join(settings.exclusive_apps))
        self.exclusive.setPlaceholderText("program names, comma separated (steam*, eldenring, …)")
        row("These programs run", self.exclusive)
        self.gpu_busy = _percent_box(settings.gpu_busy_percent)
        row("Other programs use the GPU above", self.gpu_busy, "gpu_busy")
        self.cpu_busy = _percent_box(settings.cpu_busy_percent)
        row("Other programs use the CPU above (CPU hosting)", self.cpu_busy, "cpu_busy")
        self.user_active = QCheckBox("I am using this computer (no input for less than…)")
        self.user_active.setChecked(settings.pause_when_user_active)
        self.idle_minutes = QDoubleSpinBox()
        self.idle_minutes.setRange(1, 1440)
        self.idle_minutes.setSuffix(" min")
        self.idle_minutes.setValue(settings.user_idle_minutes)
        idle = QHBoxLayout()
        idle.addWidget(self.user_active)
        idle.addWidget(self.idle_minutes)
        idle_widget = QWidget()
        idle_widget.setLayout(idle)
        row("", idle_widget, "user_active")
        self.battery = QCheckBox("the computer runs on battery")
        self.battery.setChecked(settings.pause_on_battery)
        row("", self.battery, "battery")
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0, 110)
        self.temperature.setSpecialValueText("off")
        self.temperature.setSuffix(" °C")
        self.temperature.setValue(settings.max_gpu_temperature)
        row("The GPU is hotter than", self.temperature, "temperature")
        self.schedule = QLineEdit("; ".join(settings.schedule))
        self.schedule.setPlaceholderText("any time (or e.g. mon-fri 18:00-23:30; sat 00:00-24:00)")
        row("Share only during", self.schedule)
        self.resume_after = QDoubleSpinBox()
        self.resume_after.setRange(0, 3600)
        self.resume_after.setSuffix(" s")
        self.resume_after.setValue(settings.resume_after_seconds)
        row("Resume after everything is clear for", self.resume_after)
        self.max_sessions = QSpinBox()
        self.max_sessions.setRange(0, 1000)
        self.max_sessions.setSpecialValueText("no limit")
        self.max_sessions.setValue(settings.max_sessions)
        row("While sharing: sessions at once", self.max_sessions)
        self.compute_share = QSpinBox()
        self.compute_share.setRange(5, 100)
        self.compute_share.setSuffix(" % of compute time")
        self.compute_share.setValue(round(settings.compute_share * 100))
        row("While sharing: use at most", self.compute_share)

    def values(self) -> dict:
        """The Settings fields this group edits."""
        return dict(
            pause_on_fullscreen=self.fullscreen.isChecked(),
            exclusive_apps=tuple(a.strip() for a in self.exclusive.text().split(",") if a.strip()),
            gpu_busy_percent=self.gpu_busy.value(),
            cpu_busy_percent=self.cpu_busy.value(),
            pause_when_user_active=self.user_active.isChecked(),
            user_idle_minutes=self.idle_minutes.value(),
            pause_on_battery=self.battery.isChecked(),
            max_gpu_temperature=self.temperature.value(),
            schedule=tuple(s.strip() for s in self.schedule.text().split(";") if s.strip()),
            resume_after_seconds=self.resume_after.value(),
            max_sessions=self.max_sessions.value(),
            compute_share=self.compute_share.value() / 100,
        )


def _percent_box(value: float) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(0, 100)
    box.setSuffix(" %")
    box.setSpecialValueText("off")
    box.setValue(value)
    return box
