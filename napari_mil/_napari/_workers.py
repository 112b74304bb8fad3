"""The docks' worker framework: long core calls run in thread workers whose results, progress
and errors come back on the GUI thread; closing a dock or its viewer stops them."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from magicgui.widgets import Container, Label
from qtpy.QtCore import QEvent, QObject, QTimer
from qtpy.QtWidgets import QDockWidget

from napari_mil._napari._state import state_for
from napari_mil.errors import NapariMilError

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
    caller (slow under software OpenGL). The bar is redrawn at the loop's next paint."""
    bar.native.setUpdatesEnabled(False)
    try:
        bar.value = value
    finally:
        bar.native.setUpdatesEnabled(True)  # schedules an ordinary update()


def spare_pool_threads(at_least: int = 8) -> None:
    """Give Qt's global thread pool spare threads.

    napari's thread workers run on it, and it has as many threads as there are cores. Qt also
    converts the window's image for the screen on it (a repaint of a window holding an OpenGL
    canvas), while the GUI thread waits holding the GIL: when every pool thread was in a worker
    that needed the GIL, the viewer froze for good. Seen on 2 cores with two workers at once
    (the end of a training and the comparison it leads to; the teaching demo's cohort and tissue
    detection). Idle threads cost nothing."""
    from qtpy.QtCore import QThreadPool

    pool = QThreadPool.globalInstance()
    pool.setMaxThreadCount(max(pool.maxThreadCount(), at_least))


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
        self._listening: list = []  # (signal, slot) of the state this dock listens to
        self.closed = False
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self._close_watcher = _CloseWatcher(self.native, self.close_dock)

    def listen(self, signal, slot) -> None:
        """Connect ``slot`` to a signal of the viewer's state until the dock closes. The state is
        written on the GUI thread, so ``slot`` runs there."""
        signal.connect(slot)
        self._listening.append((signal, slot))

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
        queued. Between two steps the loop draws and handles input, so a long piece of GUI work (creating
        a napari layer is slow under software OpenGL) does not freeze the viewer. A step that fails
        drops the ones after it, with a notification."""
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
            for signal, slot in self._listening:
                signal.disconnect(slot)
            self._listening.clear()
            self._steps.clear()
            self.stop_workers()
