"""The Slide & tissue dock: open a slide, set its mpp, detect and edit tissue, tile, save the grid."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, FileEdit, FloatSpinBox, PushButton, SpinBox

from napari_mil._napari._workers import DockBase, notify_info
from napari_mil.errors import NapariMilError
from napari_mil.slide.base import SLIDE_FILE_PATTERNS

if TYPE_CHECKING:
    import napari


class SlideTissueWidget(DockBase):
    """Open a slide, set its mpp, detect tissue, edit the mask, tile, and save the grid."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer)
        from napari_mil.tissue import PRESETS
        from napari_mil.usecases.slide_to_bag import GridSettings

        d = GridSettings()  # the defaults of napari-mil tile and extract
        self.path = FileEdit(label="Slide", mode="r", filter=" ".join(SLIDE_FILE_PATTERNS))
        self.open_button = PushButton(text="Open slide")
        self.mpp = FloatSpinBox(label="µm per pixel", value=0.0, min=0.0, max=20.0, step=0.001,
                                tooltip="0 = as recorded in the slide; set it when the slide has none")
        self.preset = ComboBox(label="Tissue preset", choices=list(PRESETS), value=d.preset)
        self.saturation = SpinBox(label="Saturation threshold", value=d.saturation_threshold or 0, min=0, max=255,
                                  tooltip="0 = Otsu (automatic)")
        self.min_area = FloatSpinBox(label="Min. tissue area (mm²)", value=0.1, min=0.0, max=100.0, step=0.005)
        self.detect_button = PushButton(text="Detect tissue")
        self.magnification = ComboBox(label="Magnification", choices=[40.0, 20.0, 10.0, 5.0], value=d.magnification)
        self.target_mpp = FloatSpinBox(label="or target µm/px", value=d.target_mpp or 0.0, min=0.0, max=50.0,
                                       step=0.01, tooltip="0 = use the magnification")
        self.patch_size = SpinBox(label="Patch size (px)", value=d.patch_size, min=8, max=4096, step=32)
        self.overlap = SpinBox(label="Overlap (px)", value=d.overlap, min=0, max=4095)
        self.min_tissue = FloatSpinBox(label="Min. tissue fraction", value=d.min_tissue, min=0.0, max=1.0, step=0.05)
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

    def settings(self):
        """The form's tissue and grid settings (``GridSettings``, checked: a NapariMilError if not)."""
        from napari_mil.usecases.slide_to_bag import GridSettings

        target_mpp = float(self.target_mpp.value) or None
        return GridSettings(magnification=float(self.magnification.value), target_mpp=target_mpp,
                            patch_size=int(self.patch_size.value), overlap=int(self.overlap.value),
                            min_tissue=float(self.min_tissue.value), preset=self.preset.value,
                            saturation_threshold=int(self.saturation.value) or None,
                            min_tissue_area_um2=float(self.min_area.value) * 1e6)

    def detect(self):
        """Detect tissue in a worker; the mask appears as an editable Labels layer."""
        from napari.qt.threading import create_worker

        from napari_mil.usecases.slide_to_bag import detect

        try:
            slide = self._require_slide()
            slide.require_mpp()
            settings = self.settings()
        except NapariMilError as exc:
            self._say(str(exc), error=True)
            return None
        self.status.value = f"detecting tissue on {slide.name}..."
        return self._start(create_worker(detect, slide, settings, _ignore_errors=True), self._show_mask)

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

    def tile(self):
        """Tile the (edited) mask in a worker and show the grid as a Points layer."""
        from napari.qt.threading import create_worker

        from napari_mil.usecases.slide_to_bag import make_grid

        try:
            slide = self._require_slide()
            mask = self.current_mask()
            settings = self.settings()
        except NapariMilError as exc:
            self._say(str(exc), error=True)
            return None
        self.status.value = f"tiling {slide.name}..."
        return self._start(create_worker(make_grid, slide, mask, settings, _ignore_errors=True), self._show_grid)

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
