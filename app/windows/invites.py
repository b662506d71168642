"""Private swarms by invitation in the Settings dialog: create one, show this engine's invite, join one."""

from __future__ import annotations

from app.qt import QGuiApplication, QHBoxLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget, Signal
from contract.invites import InviteError, parse_invite


class InvitePanel(QWidget):
    """`create_requested` asks for a new private swarm; `join_requested(addresses)` carries a valid invite's
    peers. The engine's own invite (from /api/status) is shown with a Copy button when there is one."""

    create_requested = Signal()
    join_requested = Signal(tuple)

    def __init__(self, invite: str | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)

        self.create_button = QPushButton("Create a private swarm")
        self.create_button.setToolTip("Start a new swarm here; others join it with the invite shown below")
        self.create_button.clicked.connect(self.create_requested)
        layout.addWidget(self.create_button)

        own = QHBoxLayout()
        self.own_invite = QLineEdit(invite or "")
        self.own_invite.setReadOnly(True)
        self.own_invite.setPlaceholderText("This engine's invite appears here once it runs a swarm")
        self.copy_button = QPushButton("Copy invite")
        self.copy_button.setEnabled(bool(invite))
        self.copy_button.clicked.connect(self._copy)
        own.addWidget(self.own_invite, 1)
        own.addWidget(self.copy_button)
        layout.addLayout(own)

        join = QHBoxLayout()
        self.pasted = QLineEdit()
        self.pasted.setPlaceholderText("Paste an invite: pollinate-invite-1.…")
        self.join_button = QPushButton("Join with an invite")
        self.join_button.clicked.connect(self._join)
        self.pasted.returnPressed.connect(self._join)
        join.addWidget(self.pasted, 1)
        join.addWidget(self.join_button)
        layout.addLayout(join)
        self.problem = QLabel()
        self.problem.setWordWrap(True)
        self.problem.setStyleSheet("color: #b3261e;")
        self.problem.hide()
        layout.addWidget(self.problem)

    def _copy(self) -> None:
        QGuiApplication.clipboard().setText(self.own_invite.text())

    def _join(self) -> None:
        try:
            addresses = parse_invite(self.pasted.text())
        except InviteError as exc:
            self.problem.setText(str(exc)[:1].upper() + str(exc)[1:] + ".")
            self.problem.show()
            return
        self.problem.hide()
        self.join_requested.emit(addresses)
