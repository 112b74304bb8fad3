"""Dock widgets. They are thin forms over the core: long work runs in thread workers, errors
become notifications, and layers are added or updated by name."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
)
from qtpy.QtCore import QEvent, QObject, QTimer
from qtpy.QtWidgets import QDockWidget

from napari_mil._napari._state import register_dock, state_for
from napari_mil.errors import NapariMilError
from napari_mil.slide.base import SLIDE_FILE_PATTERNS

if TYPE_CHECKING:
    import napari


def notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def set_progress(bar, value: int) -> None:
    """Set a magicgui ProgressBar without the synchronous repaint QProgressBar does on every
    visible change: that repaint composes the whole window, OpenGL canvas included, inside the
    caller (0.02-1.5 s under software OpenGL). The bar is redrawn at the loop's next paint."""
    bar.native.setUpdatesEnabled(False)
    try:
        bar.value = value
    finally:
        bar.native.setUpdatesEnabled(True)  # schedules an ordinary update()


def _user_message(exc: BaseException) -> str:
    """One line for the user: our errors carry it, other ones get their type named."""
    if isinstance(exc, NapariMilError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class _CloseWatcher(QObject):
    """Calls ``on_close`` once the QDockWidget holding ``widget`` is destroyed: the user closed the
    dock (napari deletes it) or its window (Qt deletes the window's children)."""

    def __init__(self, widget, on_close):
        super().__init__()
        self._on_close, self._watched = on_close, set()
        widget.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:
        if event.type() in (QEvent.Type.ParentChange, QEvent.Type.Show):  # docked, or shown in a dock
            parent = obj.parentWidget()
            while parent is not None and not isinstance(parent, QDockWidget):
                parent = parent.parentWidget()
            if parent is not None and id(parent) not in self._watched:
                self._watched.add(id(parent))
                parent.destroyed.connect(lambda *_: self._on_close())
        return False


class DockBase(Container):
    """What every dock shares: the viewer's state, a status line, and thread workers whose
    results come back on the GUI thread and whose errors become notifications.

    Long core functions run through ``_reports`` with ``self._cancel`` as their cooperative cancel.
    Closing the dock or the viewer calls ``stop_workers``: the core function stops at its next
    check (partial results are written by then: feature chunks, the last good checkpoint) and no
    callback reaches the closed widgets afterwards.

    GUI work too long for one event-loop turn (creating many layers) goes through ``_in_turns``;
    a worker whose result started such steps counts as running until they are done."""

    #: how long closing waits for a core function to reach its next cancel check
    stop_wait_s = 30.0
    #: pause between two GUI steps of ``_in_turns``, so that the loop draws and takes input between them
    step_pause_ms = 15

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self._workers: set = set()
        self._after: dict = {}  # worker -> callbacks for its end (see after())
        self._errors: dict = {}  # worker -> its error, until its end is handled
        self._threads: set[threading.Thread] = set()
        self._cancel = threading.Event()
        self._steps: deque = deque()  # GUI steps still to run, one per event-loop turn
        self._finished_during_steps: list = []  # workers whose end waits for the steps
        self.closed = False
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self._close_watcher = _CloseWatcher(self.native, self.close_dock)
        register_dock(napari_viewer, self)

    def _say(self, message: str, error: bool = False) -> None:
        self.status.value = message
        (notify_error if error else notify_info)(message)

    def _if_open(self, callback):
        """``callback`` that does nothing once the dock is closed."""
        return lambda *args: None if self.closed else callback(*args)

    def _start(self, worker, on_done, on_update=None, on_finished=None):
        """Run a thread worker, routing its result to ``on_done``, its yields to ``on_update``, its
        end to ``on_finished`` and errors to a notification, none of them after the dock closed.

        Workers are created with ``_ignore_errors=True``: the errored handler here replaces
        napari's default re-raise in the main thread, which would bypass the notification.
        """
        self._workers.add(worker)
        worker.returned.connect(self._if_open(on_done))
        worker.errored.connect(lambda exc: self._errors.__setitem__(worker, exc))
        worker.errored.connect(self._if_open(lambda exc: self._say(_user_message(exc), error=True)))
        if on_update is not None:
            worker.yielded.connect(self._if_open(on_update))
        if on_finished is not None:
            worker.finished.connect(self._if_open(on_finished))
        worker.finished.connect(lambda: self._finish(worker))
        worker.start()
        return worker

    def _finish(self, worker) -> None:
        if self._steps:  # its result is still being shown, a step per turn
            self._finished_during_steps.append(worker)
            return
        self._workers.discard(worker)
        callbacks = self._after.pop(worker, [])
        if callbacks:  # otherwise the error waits for an after() that comes late
            error = self._errors.pop(worker, None)
            for callback in callbacks:
                callback(error)

    def after(self, worker, callback) -> None:
        """Call ``callback(error or None)`` once ``worker`` has finished and this dock has handled
        its result. Safe however fast the worker is: connecting to its ``finished`` signal after
        ``_start`` misses a worker that finished in between (a queued signal is not replayed)."""
        if worker in self._workers:
            self._after.setdefault(worker, []).append(callback)
        else:
            error = self._errors.pop(worker, None)
            QTimer.singleShot(0, lambda: callback(error))

    def _reports(self, target):
        """Generator for a thread worker: runs ``target(report)`` in a thread of its own and yields
        every value it passes to ``report`` (a core function's progress callback) as it comes;
        returns ``target``'s result, or raises its error, at the end."""
        updates: queue.SimpleQueue = queue.SimpleQueue()
        done, outcome = object(), {}

        def run():
            try:
                outcome["value"] = target(updates.put)
            except BaseException as exc:  # noqa: BLE001  re-raised in the worker below
                outcome["error"] = exc
            finally:
                updates.put(done)
                self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, daemon=True)
        self._threads.add(thread)
        thread.start()
        while (update := updates.get()) is not done:
            yield update
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _in_turns(self, steps) -> None:
        """Run GUI-thread steps one per event-loop turn, ``step_pause_ms`` apart, after those already
        queued. Between two steps the loop draws and handles input, so a long piece of GUI work (napari
        takes 0.1-0.4 s to create one layer under software OpenGL) does not freeze the viewer. A step
        that fails drops the ones after it, with a notification."""
        idle = not self._steps
        self._steps.extend(steps)
        if idle and self._steps:
            QTimer.singleShot(0, self._next_step)

    @property
    def stepping(self) -> bool:
        """Whether GUI steps of ``_in_turns`` are still to run."""
        return bool(self._steps)

    @property
    def busy(self) -> bool:
        """Whether a worker of this dock, or its GUI steps, are still under way."""
        return bool(self._workers) or self.stepping

    def _next_step(self) -> None:
        if self.closed:
            self._steps.clear()
        if self._steps:
            try:
                self._steps[0]()
            except Exception as exc:  # noqa: BLE001  a notification, and the viewer keeps running
                self._steps.clear()
                self._say(_user_message(exc), error=True)
            else:
                self._steps.popleft()
        if self._steps:
            QTimer.singleShot(self.step_pause_ms, self._next_step)
            return
        waiting, self._finished_during_steps = self._finished_during_steps, []
        for worker in waiting:
            self._finish(worker)

    def is_running(self, worker) -> bool:
        """Whether a worker started by this dock has yet to deliver its result."""
        return worker in self._workers

    def stop_workers(self) -> bool:
        """Cancel the running core functions and workers, and wait up to ``stop_wait_s`` for their
        threads to end. Returns whether they all did."""
        self._cancel.set()
        for worker in list(self._workers):
            worker.quit()
        deadline = time.monotonic() + self.stop_wait_s
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in list(self._threads))

    def close_dock(self) -> None:
        """The dock or its viewer was closed: stop the work, deliver nothing more."""
        if not self.closed:
            self.closed = True
            self._steps.clear()
            self.stop_workers()


class SlideTissueWidget(DockBase):
    """Open a slide, set its mpp, detect tissue, edit the mask, tile, and save the grid."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer)

        self.path = FileEdit(label="Slide", mode="r", filter=" ".join(SLIDE_FILE_PATTERNS))
        self.open_button = PushButton(text="Open slide")
        self.mpp = FloatSpinBox(label="µm per pixel", value=0.0, min=0.0, max=20.0, step=0.001,
                                tooltip="0 = as recorded in the slide; set it when the slide has none")
        self.preset = ComboBox(label="Tissue preset", choices=["resection", "biopsy"], value="resection")
        self.saturation = SpinBox(label="Saturation threshold", value=0, min=0, max=255,
                                  tooltip="0 = Otsu (automatic)")
        self.min_area = FloatSpinBox(label="Min. tissue area (mm²)", value=0.1, min=0.0, max=100.0, step=0.005)
        self.detect_button = PushButton(text="Detect tissue")
        self.magnification = ComboBox(label="Magnification", choices=[40.0, 20.0, 10.0, 5.0], value=20.0)
        self.target_mpp = FloatSpinBox(label="or target µm/px", value=0.0, min=0.0, max=50.0, step=0.01,
                                       tooltip="0 = use the magnification")
        self.patch_size = SpinBox(label="Patch size (px)", value=256, min=8, max=4096, step=32)
        self.overlap = SpinBox(label="Overlap (px)", value=0, min=0, max=4095)
        self.min_tissue = FloatSpinBox(label="Min. tissue fraction", value=0.5, min=0.0, max=1.0, step=0.05)
        self.tile_button = PushButton(text="Tile")
        self.save_path = FileEdit(label="Save grid", mode="w", filter="*.h5")
        self.save_button = PushButton(text="Save grid (.h5)")
        self.status.value = "Open a slide, or load a sample from File > Open Sample > napari-mil"

        self.extend([
            self.path, self.open_button, self.mpp, self.preset, self.saturation, self.min_area,
            self.detect_button, self.magnification, self.target_mpp, self.patch_size, self.overlap,
            self.min_tissue, self.tile_button, self.save_path, self.save_button, self.status,
        ])
        self.preset.changed.connect(self._apply_preset)
        self.open_button.clicked.connect(self.open_slide)
        self.mpp.changed.connect(self._set_mpp)
        self.detect_button.clicked.connect(self.detect)
        self.tile_button.clicked.connect(self.tile)
        self.save_button.clicked.connect(self.save_grid)
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self.native.setMaximumWidth(460)  # leave the canvas most of the window
        self._apply_preset(self.preset.value)
        for layer in self.viewer.layers:  # a slide opened before the dock
            self._adopt(layer)

    # ---- helpers --------------------------------------------------------------------
    def _apply_preset(self, name: str) -> None:
        from napari_mil.tissue import PRESETS

        self.min_area.value = PRESETS[name].min_tissue_area_um2 / 1e6

    def _on_layer_inserted(self, event) -> None:
        self._adopt(event.value)

    def _adopt(self, layer) -> None:
        slide = layer.metadata.get("slide") if hasattr(layer, "metadata") else None
        if slide is None:
            return
        self.state.slide = slide
        self.state.slide_layer = layer.name
        self.mpp.value = slide.mpp if slide.mpp_source == "user" else 0.0
        mpp = f"{slide.mpp:.4g} µm/px" if slide.mpp else "unknown µm/px: enter it above"
        self.status.value = f"{slide.name}: {slide.dimensions[0]} x {slide.dimensions[1]} px, {mpp}"

    def _require_slide(self):
        if self.state.slide is None:
            raise NapariMilError("no slide yet: open one first (Slide field, or File > Open)")
        return self.state.slide

    # ---- actions --------------------------------------------------------------------
    def open_slide(self, path: str | Path | None = None):
        """Open the slide in the Slide field (or ``path``) as a multiscale layer."""
        path = Path(path) if path else Path(self.path.value)
        if not str(path) or path == Path("."):
            self._say("choose a slide file first", error=True)
            return None
        try:
            from napari_mil._napari._layers import slide_layer_data
            from napari_mil.slide import open_slide

            mpp = self.mpp.value or None
            slide = open_slide(path, mpp=mpp)
        except NapariMilError as exc:
            self._say(str(exc), error=True)
            return None
        data, kwargs, _ = slide_layer_data(slide)
        layer = self.viewer.add_image(data, **kwargs)
        if slide.mpp is None:
            self._say(f"{slide.path.name}: {slide.mpp_note}; enter µm per pixel before detecting tissue", error=True)
        self.viewer.reset_view()
        return layer

    def _set_mpp(self, value: float) -> None:
        """Apply a user mpp to the current slide and rescale its layers."""
        slide = self.state.slide
        if slide is None or not value:
            return
        from napari_mil.slide import validate_mpp

        try:
            slide.mpp = validate_mpp(value, "the entered mpp")
        except NapariMilError as exc:
            self._say(str(exc), error=True)
            return
        slide.mpp_source, slide.mpp_note = "user", ""
        if self.state.slide_layer in self.viewer.layers:
            layer = self.viewer.layers[self.state.slide_layer]
            layer.scale = (value, value)
            layer.metadata["napari_mil"]["mpp"] = value
        self.status.value = f"{slide.name}: mpp set to {value:.4g} µm/px"

    def tissue_params(self):
        from dataclasses import replace

        from napari_mil.tissue import PRESETS

        params = PRESETS[self.preset.value]
        return replace(
            params,
            saturation_threshold=int(self.saturation.value) or None,
            min_tissue_area_um2=float(self.min_area.value) * 1e6,
        )

    def detect(self):
        """Detect tissue in a worker; the mask appears as an editable Labels layer."""
        from napari.qt.threading import create_worker

        from napari_mil.tissue import detect_tissue

        try:
            slide = self._require_slide()
            slide.require_mpp()
        except NapariMilError as exc:
            self._say(str(exc), error=True)
            return None
        params = self.tissue_params()
        self.status.value = f"detecting tissue on {slide.name}..."
        return self._start(create_worker(detect_tissue, slide, params, _ignore_errors=True), self._show_mask)

    def mask_layer_name(self) -> str:
        return f"{self.state.slide.name} tissue"

    def grid_layer_name(self) -> str:
        return f"{self.state.slide.name} patches"

    def _show_mask(self, mask) -> None:
        from napari_mil._napari._layers import mask_layer_kwargs

        slide = self.state.slide
        self.state.tissue_mask = mask
        name = self.mask_layer_name()
        data = mask.mask.astype(np.uint8)
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = data
            for key, value in mask_layer_kwargs(slide, mask).items():
                setattr(layer, key, value)
        else:
            layer = self.viewer.add_labels(data, name=name, **mask_layer_kwargs(slide, mask))
        layer.metadata["napari_mil_mask"] = mask
        if mask.mask.any():
            self.status.value = (
                f"tissue covers {mask.tissue_area_fraction:.1%} of {slide.name}; "
                "paint (label 1) or erase (label 0) in the mask layer, then Tile"
            )
            notify_info(self.status.value)
        else:
            self._say(
                f"no tissue found on {slide.name}: try the 'biopsy' preset, a lower saturation "
                "threshold, or paint the tissue into the mask layer", error=True,
            )

    def current_mask(self):
        """The mask as the user left it: the Labels layer's (possibly edited) pixels."""
        from napari_mil.tissue import TissueMask

        name = self.mask_layer_name()
        if name not in self.viewer.layers:
            raise NapariMilError("no tissue mask yet: press 'Detect tissue' first")
        layer = self.viewer.layers[name]
        base = layer.metadata.get("napari_mil_mask") or self.state.tissue_mask
        return TissueMask(np.asarray(layer.data) > 0, base.downsample, base.params)

    def grid_params(self) -> dict:
        target_mpp = float(self.target_mpp.value) or None
        return dict(
            patch_size=int(self.patch_size.value),
            overlap=int(self.overlap.value),
            min_tissue=float(self.min_tissue.value),
            target_mpp=target_mpp,
            magnification=None if target_mpp else float(self.magnification.value),
        )

    def tile(self):
        """Tile the (edited) mask in a worker and show the grid as a Points layer."""
        from napari.qt.threading import create_worker

        from napari_mil.tiling import make_patch_grid

        try:
            slide = self._require_slide()
            mask = self.current_mask()
        except NapariMilError as exc:
            self._say(str(exc), error=True)
            return None
        self.status.value = f"tiling {slide.name}..."
        return self._start(create_worker(make_patch_grid, slide, mask, _ignore_errors=True, **self.grid_params()), self._show_grid)

    def _show_grid(self, grid) -> None:
        from napari_mil._napari._layers import grid_layer_data

        slide = self.state.slide
        self.state.grid = grid
        name = self.grid_layer_name()
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        data, kwargs = grid_layer_data(slide, grid)
        self.viewer.add_points(data, name=name, **kwargs)
        self.status.value = (
            f"{len(grid)} patches of {grid.patch_size} px at {grid.target_mpp:.3g} µm/px "
            f"(level {grid.level}, {grid.patch_size_level0} px at level 0)"
        )
        notify_info(self.status.value)

    def save_grid(self, path: str | Path | None = None):
        """Write the current grid to HDF5 (atomically)."""
        grid = self.state.grid
        if grid is None:
            self._say("no patch grid yet: press 'Tile' first", error=True)
            return None
        path = Path(path) if path else Path(self.save_path.value)
        if not str(path) or path == Path(".") or path.is_dir():
            self._say("choose a file name for the grid (.h5) first", error=True)
            return None
        try:
            written = grid.save(path)
        except OSError as exc:
            self._say(f"could not write {path}: {exc}", error=True)
            return None
        self._say(f"saved {len(grid)} patch coordinates to {written}")
        return written
