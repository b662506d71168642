"""First-run onboarding: what sharing means, which swarm, how much memory it may use. Sharing stays off."""

from __future__ import annotations

import dataclasses

from app.qt import (
    QButtonGroup,
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QGroupBox,
    QLabel,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)
from app.settings import SWARM_LABELS, SWARMS, Settings
from app.windows.settings import MemorySlider

INTRO = (
    "<h2>Welcome to Pollinate</h2>"
    "<p>Pollinate runs large language models on a swarm of computers: each one holds a few of the model's "
    "blocks, and together they answer chats that no single consumer GPU could.</p>"
    "<p><b>Sharing</b> means this computer hosts some blocks for the swarm: other people's prompts pass "
    "through your GPU (as numbers, not text) and use up to the memory you allow below. You earn points that "
    "give your own chats priority. You can stop sharing at any moment.</p>"
    "<p>Sharing stays <b>off</b> until you turn it on with <i>Share my GPU</i>.</p>"
)

SWARM_HELP = {
    "local": "Try everything on this computer with a small real model (SmolLM2-135M-Instruct) served by "
    "two demo servers: quick, simple answers, no download.",
    "public": "Join the public Petals swarm and help serve open models to everyone.",
    "private": "Join your own swarm; add your peers' addresses later in Settings.",
}


class OnboardingDialog(QDialog):
    """Collects the first-run choices; `result_settings()` returns them with onboarded set."""

    def __init__(
        self,
        settings: Settings,
        free_bytes: float | None = None,
        parent: QWidget | None = None,
        memory_name: str = "memory",
    ):
        super().__init__(parent)
        self.settings = settings
        self.setWindowTitle("Welcome to Pollinate")
        self.setMinimumSize(660, 540)
        layout = QVBoxLayout(self)
        intro = QLabel(INTRO)
        intro.setWordWrap(True)
        layout.addWidget(intro)

        swarm_box = QGroupBox("Which swarm?")
        swarm_layout = QVBoxLayout(swarm_box)
        self.swarm_buttons = QButtonGroup(self)
        self.swarm_radios: dict[str, QRadioButton] = {}
        for swarm in SWARMS:
            radio = QRadioButton(SWARM_LABELS[swarm])
            radio.setChecked(swarm == settings.swarm)
            self.swarm_buttons.addButton(radio)
            self.swarm_radios[swarm] = radio
            help_text = QLabel(SWARM_HELP[swarm])
            help_text.setWordWrap(True)
            help_text.setContentsMargins(24, 0, 0, 4)
            help_text.setStyleSheet("color: #555;")
            swarm_layout.addWidget(radio)
            swarm_layout.addWidget(help_text)
        layout.addWidget(swarm_box)

        memory_box = QGroupBox("How much memory may sharing use?")
        memory_layout = QVBoxLayout(memory_box)
        self.memory = MemorySlider(settings.memory_fraction, free_bytes, memory_name=memory_name)
        memory_layout.addWidget(self.memory)
        layout.addWidget(memory_box)
        layout.addStretch(1)

        self.autostart = QCheckBox("Start Pollinate when I log in")
        self.autostart.setChecked(settings.autostart)
        layout.addWidget(self.autostart)
        buttons = QDialogButtonBox()
        self.start_button = buttons.addButton("Get started", QDialogButtonBox.ButtonRole.AcceptRole)
        buttons.accepted.connect(self.accept)
        layout.addWidget(buttons)

    @classmethod
    def for_this_computer(cls, settings: Settings) -> OnboardingDialog:
        """The dialog with the memory slider in GB of this computer's GPU memory (NVIDIA) or RAM, before any
        engine runs: the same figures the engine's plan will use."""
        from app.local_memory import probe_hardware
        from app.viewmodels.dashboard import shareable_memory

        free, name = shareable_memory(probe_hardware(), None, settings.memory_fraction)
        return cls(settings, free_bytes=free, memory_name=name)

    def result_settings(self) -> Settings:
        swarm = next(s for s, radio in self.swarm_radios.items() if radio.isChecked())
        return dataclasses.replace(
            self.settings,
            onboarded=True,
            swarm=swarm,
            memory_fraction=self.memory.fraction(),
            autostart=self.autostart.isChecked(),
            sharing_enabled=False,
        ).validated()
