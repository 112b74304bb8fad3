"""The Features dock: encode the open slide's patches, with progress, cancel and the cache."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import ComboBox, FileEdit, Label, ProgressBar, PushButton, SpinBox

from napari_mil._napari._workers import DockBase, set_progress
from napari_mil.devices import available_devices
from napari_mil.errors import ExtractionCancelled, NapariMilError
from napari_mil.paths import default_feature_root

if TYPE_CHECKING:
    import napari


class FeaturesWidget(DockBase):
    """Choose an encoder, device and batch size; extract (or load cached) patch features."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer)
        from napari_mil.encoders import DEFAULT_ENCODER, list_encoders

        self.encoder = ComboBox(label="Encoder", choices=[spec.name for spec in list_encoders()], value=DEFAULT_ENCODER,
                                tooltip="hne_stats and random_cnn run offline; foundation models need their weights")
        self.device = ComboBox(label="Device", choices=available_devices(), value="auto")
        self.batch_size = SpinBox(label="Batch size", value=64, min=1, max=4096)
        self.workers = SpinBox(label="Reading workers", value=min(4, max(0, (os.cpu_count() or 2) - 1)), min=0, max=32)
        self.out = FileEdit(label="Feature folder", mode="d", value=str(default_feature_root()))
        self.extract_button = PushButton(text="Extract features")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1)
        self.speed = Label(value="")
        self.status.value = "Tile a slide in the Slide & tissue dock, then extract its features here."
        self.extend([self.encoder, self.device, self.batch_size, self.workers, self.out, self.extract_button,
                     self.cancel_button, self.progress, self.speed, self.status])
        self.extract_button.clicked.connect(self.extract)
        self.cancel_button.clicked.connect(self.cancel)
        self.native.setMaximumWidth(460)

    def extract(self):
        """Extract in a worker; cached features of the same slide, grid and encoder load at once."""
        from napari.qt.threading import create_worker

        state = self.state
        try:
            if state.slide is None:
                raise NapariMilError("no slide yet: open one in the Slide & tissue dock")
            if state.grid is None or len(state.grid) == 0:
                raise NapariMilError("no patches yet: detect tissue and press 'Tile' in the Slide & tissue dock")
        except NapariMilError as exc:
            self._say(str(exc), error=True)
            return None
        self._cancel.clear()
        self.progress.max, self.progress.value = len(state.grid), 0
        self.extract_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = f"extracting {len(state.grid)} patches of {state.slide.name} with {self.encoder.value}..."
        worker = create_worker(self._run, state.slide.path, state.slide.name, state.grid, self.encoder.value,
                               self.device.value, int(self.batch_size.value), int(self.workers.value),
                               Path(self.out.value), state.slide.mpp, _ignore_errors=True)
        return self._start(worker, self._done, on_update=self._on_progress, on_finished=self._idle)

    def _run(self, slide_path, name, grid, encoder_name, device, batch_size, workers, out, mpp):
        """Generator run by the worker: yields progress, returns the ExtractionResult.

        The features come from ``slide_to_bag``, as for ``napari-mil extract``: the grid (tiled
        from the mask as edited in the Slide & tissue dock) is written where that use case finds
        a slide's grid, ``out``/patches/``name``.h5, and is used from there."""
        from napari_mil.encoders import create_encoder
        from napari_mil.usecases.slide_to_bag import slide_to_bag

        encoder = create_encoder(encoder_name, device=device)
        grid.save(Path(out) / "patches" / f"{name}.h5")
        try:
            result = yield from self._reports(lambda report: slide_to_bag(
                slide_path, encoder, out, mpp=mpp, batch_size=batch_size, num_workers=workers, progress=report,
                cancel=self._cancel.is_set))
        except ExtractionCancelled as exc:
            message = str(exc)
            raise ExtractionCancelled(message if "cancel" in message else f"extraction cancelled: {message}") from None
        return replace(result, bag=result.bag.widened())  # the open slide's bag is run many times

    def _on_progress(self, update) -> None:
        set_progress(self.progress, update.done)
        self.speed.value = f"{update.tiles_per_s:.0f} tiles/s, about {update.eta_s:.0f} s left"

    def _idle(self) -> None:
        self.extract_button.enabled, self.cancel_button.enabled = True, False

    def _done(self, result) -> None:
        self.state.encoder = result.bag.encoder or self.encoder.value
        self.state.features = result.bag
        set_progress(self.progress, self.progress.max)
        how = "loaded from the cache" if result.cached else f"extracted at {result.tiles_per_s:.0f} tiles/s"
        skipped = f", {result.skipped} unreadable patches skipped" if result.skipped else ""
        self._say(f"{len(result.bag)} features of {result.bag.dim} dimensions {how} in {result.seconds:.1f} s"
                  f"{skipped} ({result.path.name})")

    def cancel(self) -> None:
        """Stop after the current batch; finished chunks stay on disk and resume next time."""
        self._cancel.set()
        self.status.value = "cancelling after the current batch..."
