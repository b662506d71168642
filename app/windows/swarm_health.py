"""The dashboard's "Swarm" tab: every model the swarm serves and a table of the current model's servers."""

from __future__ import annotations

from app.qt import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from app.viewmodels.swarm_health import SERVER_COLUMNS, model_lines, server_rows


class SwarmHealthView(QWidget):
    """Shows /api/swarm like health.petals.dev: models with coverage, then one row per server."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        layout = QVBoxLayout(self)
        self.models_label = QLabel()
        self.models_label.setWordWrap(True)
        self.table = QTableWidget(0, len(SERVER_COLUMNS))
        self.table.setHorizontalHeaderLabels(SERVER_COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        layout.addWidget(self.models_label)
        layout.addWidget(self.table, 1)
        self.show_swarm(None)

    def show_swarm(self, swarm: dict | None) -> None:
        """Replace the content with this /api/swarm answer (None: not known yet)."""
        lines = model_lines(swarm)
        if swarm is None:
            lines = ["Swarm health: unknown until the engine has joined the swarm."]
        elif not lines:
            lines = ["The swarm's model index is empty."]
        title = f"Servers of {swarm.get('model')}:" if swarm else ""
        self.models_label.setText("\n".join([*lines, "", title] if title else lines))
        rows = server_rows(swarm)
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                self.table.setItem(r, c, QTableWidgetItem(text))
