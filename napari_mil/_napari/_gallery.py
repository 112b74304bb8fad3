"""The top-k gallery: each map's highest-attention patches as buttons; a click goes to the patch.

The patches are read from the slide in a thread worker; the buttons and their images are made
on the GUI thread. Requests come after every epoch while a model trains: one read runs at a
time, and a newer request replaces one still waiting (its result, if it was read, is dropped)."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import Container, Label, PushButton

ICON_PX = 64  # patches are read from the slide level nearest this many pixels a side


def read_top_k(slide, maps: dict, k: int) -> dict[str, list[tuple[int, np.ndarray]]]:
    """For each map, its ``k`` highest-attention patches as (index, RGB uint8 array), read from the
    slide level nearest ``ICON_PX`` pixels a patch. Numpy only: run in a worker."""
    from napari_mil.exports import read_top_k as read_patches

    return {panel: read_patches(slide, amap, k, ICON_PX) for panel, amap in maps.items()}


class Gallery(Container):
    """A row of buttons per map. ``dock`` runs the reading worker (DockBase._start); ``on_click(amap,
    index)`` is called with the map and patch of a clicked button."""

    def __init__(self, dock, on_click):
        super().__init__(layout="vertical", labels=False)
        self._dock, self._on_click = dock, on_click
        self._generation = 0  # the newest request's number: older results are dropped
        self._waiting = None  # (generation, slide, maps, k) of a request not read yet
        self._reading = False

    def request(self, slide, maps: dict, k: int) -> None:
        """Show the top ``k`` of ``maps`` once read; replaces any request not shown yet."""
        self._generation += 1
        self._waiting = (self._generation, slide, dict(maps), int(k))
        if not self._reading:
            self._read_next()

    def reset(self) -> None:
        """Empty the gallery and forget the requests under way."""
        self._generation += 1
        self._waiting = None
        self.clear()

    def _read_next(self) -> None:
        from napari.qt.threading import create_worker

        self._reading = False
        if self._waiting is None or self._dock.closed:
            return
        (generation, slide, maps, k), self._waiting = self._waiting, None
        self._reading = True
        worker = create_worker(read_top_k, slide, maps, k, _ignore_errors=True)
        self._dock._start(worker, lambda patches: self._show(generation, maps, k, patches),
                          on_finished=self._read_next)

    def _show(self, generation: int, maps: dict, k: int, patches: dict) -> None:
        from qtpy.QtCore import QSize
        from qtpy.QtGui import QIcon, QImage, QPixmap

        if generation != self._generation:  # a newer request came meanwhile
            return
        self.clear()
        for panel, amap in maps.items():
            row = Container(layout="horizontal", labels=False, label=panel)
            row.append(Label(value=f"{panel} top {k}"))
            for i, patch in patches[panel]:
                h, w = patch.shape[:2]
                image = QImage(patch.data, w, h, patch.strides[0], QImage.Format.Format_RGB888).copy()
                button = PushButton(text="")
                button.native.setIcon(QIcon(QPixmap.fromImage(image)))
                button.native.setIconSize(QSize(48, 48))
                x, y = (int(v) for v in amap.coords[i])
                button.native.setToolTip(f"{panel}: attention {amap.values[i]:.2e} at ({x}, {y})")
                button.clicked.connect(lambda *_, i=i, amap=amap: self._on_click(amap, i))
                row.append(button)
            self.append(row)
