"""Small painted widgets: the model's blocks with swarm coverage, and a line plot over time (QPainter)."""

from __future__ import annotations

import time

from app.qt import QColor, QFont, QPainter, QPainterPath, QPen, QPointF, QRectF, QSize, Qt, QWidget
from app.viewmodels.dashboard import BlockCell

MISSING = QColor("#e0413a")
ONE_SERVER = QColor("#f5c842")
COVERED = QColor("#2fb35a")
UNKNOWN = QColor("#c9ced4")
MINE = QColor("#1f6fd1")


class BlockMap(QWidget):
    """A row (wrapping) of tiles, one per block: colour = servers holding it, blue outline = hosted here."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.cells: list[BlockCell] = []
        self.planned: range = range(0)
        self.note = ""  # shown instead of counts when none are known (discovering, or no data)
        self.setFixedHeight(44)

    def set_cells(self, cells: list[BlockCell], planned: range = range(0), note: str = "") -> None:
        self.cells, self.planned, self.note = cells, planned, note
        self.setToolTip(self._summary())
        self.update()

    def _summary(self) -> str:
        if self.note:
            return self.note
        if not self.cells:
            return "No swarm information yet"
        missing = [c.index for c in self.cells if c.servers == 0]
        text = f"{len(self.cells)} blocks; " + (
            f"{len(missing)} without a server" if missing else "all served"
        )
        return text

    def sizeHint(self) -> QSize:
        return QSize(480, 90)

    def _layout(self) -> tuple[int, float, float]:
        count = max(1, len(self.cells))
        width = self.width() - 8
        per_row = count
        tile = width / per_row
        while tile < 14 and per_row > 1:  # wrap big models (80 blocks) into rows of readable tiles
            per_row = (per_row + 1) // 2
            tile = width / per_row
        return per_row, tile, min(tile, 34.0)

    def paintEvent(self, _event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        if not self.cells or (self.note and all(c.servers is None for c in self.cells)):
            painter.setPen(self.palette().color(self.foregroundRole()))
            text = self.note or "No swarm information yet"
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, text)
            return
        per_row, tile, height = self._layout()
        font = QFont(self.font())
        font.setPointSizeF(max(6.0, min(9.0, tile / 3.2)))
        painter.setFont(font)
        for cell in self.cells:
            row, col = divmod(cell.index, per_row)
            rect = QRectF(4 + col * tile + 1, 4 + row * (height + 6), tile - 2, height)
            if cell.servers is None:
                color = UNKNOWN
            else:
                color = MISSING if cell.servers == 0 else ONE_SERVER if cell.servers == 1 else COVERED
            painter.setBrush(color)
            outline = (
                MINE if cell.mine else QColor("#555") if cell.index in self.planned else color.darker(140)
            )
            pen = QPen(
                outline,
                3 if cell.mine else 1,
                Qt.PenStyle.DashLine
                if cell.index in self.planned and not cell.mine
                else Qt.PenStyle.SolidLine,
            )
            painter.setPen(pen)
            painter.drawRoundedRect(rect, 3, 3)
            if tile >= 16:
                painter.setPen(QColor("#1a1a1a"))
                label = "?" if cell.servers is None else str(cell.servers)
                painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, label)
        rows = (len(self.cells) + per_row - 1) // per_row
        wanted = int(rows * (height + 6) + 8)
        if self.height() != wanted:
            self.setFixedHeight(wanted)


class TimePlot(QWidget):
    """A line plot of (unix time, value) points over the last `window_s` seconds, with a max label."""

    def __init__(self, title: str, unit: str, window_s: float = 300.0, parent: QWidget | None = None):
        super().__init__(parent)
        self.title, self.unit, self.window_s = title, unit, window_s
        self.points: list[tuple[float, float]] = []
        self.now: float | None = None
        self.setMinimumHeight(120)

    def set_points(self, points: list[tuple[float, float]], now: float | None = None) -> None:
        self.points, self.now = points, now
        self.update()

    def sizeHint(self) -> QSize:
        return QSize(480, 150)

    def paintEvent(self, _event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        text_color = self.palette().color(self.foregroundRole())
        area = QRectF(44, 22, self.width() - 54, self.height() - 40)
        painter.fillRect(area, self.palette().color(self.backgroundRole()).lighter(104))
        painter.setPen(QPen(QColor("#999"), 1))
        painter.drawRect(area)
        now = self.now or (self.points[-1][0] if self.points else time.time())
        start = now - self.window_s
        visible = [(t, v) for t, v in self.points if t >= start]
        top = max([v for _, v in visible] + [1.0]) * 1.15
        painter.setPen(text_color)
        painter.drawText(
            QRectF(0, 0, self.width(), 20),
            Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
            f"  {self.title}",
        )
        latest = visible[-1][1] if visible else 0.0
        painter.drawText(
            QRectF(0, 0, self.width() - 10, 20),
            Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
            f"now {latest:.1f} {self.unit}",
        )
        painter.drawText(QRectF(0, area.top() - 8, 40, 16), Qt.AlignmentFlag.AlignRight, f"{top:.0f}")
        painter.drawText(QRectF(0, area.bottom() - 8, 40, 16), Qt.AlignmentFlag.AlignRight, "0")
        painter.drawText(
            QRectF(area.left(), area.bottom() + 2, area.width(), 16),
            Qt.AlignmentFlag.AlignLeft,
            f"-{self.window_s / 60:.0f} min",
        )
        painter.drawText(
            QRectF(area.left(), area.bottom() + 2, area.width(), 16), Qt.AlignmentFlag.AlignRight, "now"
        )
        if len(visible) < 2:
            painter.drawText(area, Qt.AlignmentFlag.AlignCenter, "waiting for data…")
            return
        path = QPainterPath()
        for i, (t, v) in enumerate(visible):
            point = QPointF(
                area.left() + (t - start) / self.window_s * area.width(),
                area.bottom() - v / top * area.height(),
            )
            path.moveTo(point) if i == 0 else path.lineTo(point)
        fill = QPainterPath(path)
        fill.lineTo(QPointF(path.currentPosition().x(), area.bottom()))
        fill.lineTo(
            QPointF(area.left() + (visible[0][0] - start) / self.window_s * area.width(), area.bottom())
        )
        fill.closeSubpath()
        painter.fillPath(fill, QColor(47, 179, 90, 60))
        painter.setPen(QPen(COVERED.darker(120), 2))
        painter.drawPath(path)
