"""A small line plot for live training curves, drawn with QPainter (no plotting dependency)."""

from __future__ import annotations

import itertools
import math

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

SERIES_COLOURS = ["#4fc3f7", "#ffb74d", "#81c784", "#f06292", "#ba68c8"]


class CurvePlot(QWidget):
    """Named series of (x, y) points, each scaled to the plot's own y range, with a legend.

    ``series`` maps a name to its points; ``add(name, x, y)`` appends and repaints."""

    def __init__(self, title: str = "", y_range: tuple[float, float] | None = None, parent=None):
        super().__init__(parent)
        self.title = title
        self.y_range = y_range  # fixed (e.g. 0-1 for AUC), else from the data
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.setMinimumHeight(120)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def add(self, name: str, x: float, y: float) -> None:
        if y is None or not math.isfinite(y):
            return
        self.series.setdefault(name, []).append((float(x), float(y)))
        self.update()

    def clear(self) -> None:
        self.series.clear()
        self.update()

    def limits(self) -> tuple[float, float, float, float]:
        points = [p for pts in self.series.values() for p in pts]
        if not points:
            return 0.0, 1.0, 0.0, 1.0
        xs, ys = zip(*points)
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)
        y0, y1 = self.y_range or (min(ys), max(ys))
        if y1 <= y0:
            y0, y1 = y0 - 0.5, y1 + 0.5
        return x0, x1, y0, y1

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        left, right, top, bottom = 40, 8, 16, 18
        painter.fillRect(0, 0, w, h, QColor("#262930"))
        painter.setPen(QPen(QColor("#9aa0a6"), 1))
        painter.drawRect(left, top, w - left - right, h - top - bottom)
        x0, x1, y0, y1 = self.limits()
        painter.drawText(4, top + 8, f"{y1:.3g}")
        painter.drawText(4, h - bottom, f"{y0:.3g}")
        painter.drawText(left, h - 4, f"epoch {x0:.0f}")
        painter.drawText(w - right - 60, h - 4, f"{x1:.0f}")
        painter.drawText(left + 4, 12, self.title)

        def to_screen(x, y):
            return QPointF(left + (x - x0) / (x1 - x0) * (w - left - right),
                           top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom))

        legend_x = left + 8 + painter.fontMetrics().horizontalAdvance(self.title) + 12
        for k, (name, points) in enumerate(self.series.items()):
            colour = QColor(SERIES_COLOURS[k % len(SERIES_COLOURS)])
            painter.setPen(QPen(colour, 2))
            for a, b in itertools.pairwise(points):
                painter.drawLine(to_screen(*a), to_screen(*b))
            if len(points) == 1:
                painter.drawEllipse(to_screen(*points[0]), 2, 2)
            painter.drawText(legend_x, 12, name)
            legend_x += painter.fontMetrics().horizontalAdvance(name) + 12
        painter.setPen(Qt.PenStyle.NoPen)
        painter.end()
