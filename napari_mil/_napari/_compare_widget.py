"""The Compare dock: an MHIM-MIL teacher beside its hard-instance-masked student.

The two maps sit in napari's grid mode, one viewbox each with one shared camera, so they pan
and zoom together. Each panel holds the same six layers, bottom to top: the slide, the map,
the ground truth's tumour outline (when the slide has one), and the random-high, low and random
masks as patch outlines. Other layers are hidden while the comparison is shown and come back after.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
)

from napari_mil._napari._widgets import DockBase
from napari_mil.errors import NapariMilError
from napari_mil.heatmaps import MASK_KINDS

if TYPE_CHECKING:
    import napari

PANELS = ("teacher", "student")
MASK_COLOURS = {"high": "#ff2d95", "low": "#2f9bff", "random": "#c8c8c8"}
TRUTH_COLOUR = "#39ff14"  # the tumour outline
MASK_NAMES = {"high": "masked random-high", "low": "masked low", "random": "masked random"}
NORM_LABELS = [("raw softmax", "raw"), ("min-max", "minmax"), ("percentile rank", "rank"), ("log (× uniform)", "log")]


def ground_truth(slide):
    """(tumour mask, downsample) of a synthetic slide, or None for slides without ground truth."""
    from napari_mil.synthetic import SyntheticSlide

    try:
        info = SyntheticSlide.load(slide.path)
        return info.tumour_mask(), info.mask_downsample
    except (OSError, ValueError, TypeError, KeyError):
        return None


class CompareWidget(DockBase):
    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer)
        from napari_mil.training.mhim import PRESETS

        self.preset = ComboBox(label="Masks from", choices=["the model's training", *PRESETS], value="the model's training",
                               tooltip="the MHIM-MIL masking rules applied to the teacher's scores")
        self.ratio_h = FloatSpinBox(label="High-attention share", value=0.0, min=0.0, max=1.0, step=0.01,
                                    tooltip="mask_ratio_h at the step shown (it decays over training); 0 = the recipe's")
        self.show_button = PushButton(text="Show teacher | student")
        self.single_button = PushButton(text="Back to one view", enabled=False)
        self.norm = ComboBox(label="Normalisation", choices=NORM_LABELS, value="minmax")
        self.colormap = ComboBox(label="Colour map", choices=["inferno", "turbo", "viridis", "magma", "plasma"],
                                 value="inferno")
        self.opacity = FloatSlider(label="Opacity", value=0.6, min=0.0, max=1.0, step=0.05)
        self.transmil_layer = ComboBox(label="TransMIL layer", choices=[("1", 0), ("2", 1), ("mean", -1)], value=1)
        self.transmil_head = SpinBox(label="TransMIL head", value=-1, min=-1, max=63, tooltip="-1 = mean over heads")
        self.mask_toggles = {kind: CheckBox(text=MASK_NAMES[kind], value=True) for kind in MASK_KINDS}
        self.colour_bar = Label(value="")
        self.hover = Label(value="")
        self.k = SpinBox(label="Top k", value=6, min=1, max=32)
        self.gallery = Container(layout="vertical", labels=False)
        self.export_folder = FileEdit(label="Export to", mode="d")
        export_row = Container(layout="horizontal", labels=False)
        self.export_buttons = {fmt: PushButton(text=fmt) for fmt in ("GeoJSON", "CSV", "PNG", "top-k")}
        export_row.extend(list(self.export_buttons.values()))
        self.status.value = "Needs a teacher and a student: train with MHIM-MIL (Retrain dock) or load an MHIM-MIL checkpoint."
        self.extend([self.preset, self.ratio_h, self.show_button, self.single_button, self.norm, self.colormap,
                     self.opacity, self.transmil_layer, self.transmil_head, *self.mask_toggles.values(),
                     self.colour_bar, self.hover, self.k, self.gallery, self.export_folder, export_row, self.status])
        self.hover.native.setWordWrap(True)
        self.maps: dict = {}  # panel -> AttentionMap
        self._drawing: dict = {}  # the maps the GUI steps under way show
        self._announce = False  # whether the pair under way ends with a notification
        self._hidden: list = []  # layers hidden while comparing
        self._truth_of, self._truth = None, None  # the slide whose ground truth was read, and it
        self.show_button.clicked.connect(self.compare)
        self.single_button.clicked.connect(self.single_view)
        self.norm.changed.connect(lambda _: self.restyle())
        self.colormap.changed.connect(lambda _: self.restyle())
        self.opacity.changed.connect(self._set_opacity)
        self.transmil_layer.changed.connect(lambda _: self.maps and self.compare())
        self.transmil_head.changed.connect(lambda _: self.maps and self.compare())
        for kind, box in self.mask_toggles.items():
            box.changed.connect(lambda on, kind=kind: self._toggle_mask(kind, on))
        self.k.changed.connect(lambda _: self.build_gallery())
        for fmt, button in self.export_buttons.items():
            button.clicked.connect(lambda *_, fmt=fmt: self.export(fmt))
        self.viewer.mouse_move_callbacks.append(self._on_mouse_move)
        self.native.setMaximumWidth(460)

    # ---- computing the pair ----------------------------------------------------------------
    def mhim_config(self):
        from dataclasses import replace

        from napari_mil.training.mhim import MHIMConfig, preset

        if self.preset.value == "the model's training":
            cfg = self.state.mhim or preset("camelyon16_transmil" if self._is_transmil() else "camelyon16_abmil")
        else:
            cfg = preset(self.preset.value)
        if not isinstance(cfg, MHIMConfig):
            cfg = MHIMConfig(**cfg)
        return replace(cfg, mask_ratio_h=self.ratio_h.value) if self.ratio_h.value else cfg

    def _is_transmil(self) -> bool:
        return getattr(self.state.model, "CHOOSES_ATTENTION", False)

    def compare(self):
        """Compute the teacher's and the student's maps in a worker, then show them side by side."""
        from napari.qt.threading import create_worker

        from napari_mil.usecases.prediction import teacher_student_maps

        state = self.state
        try:
            if state.slide is None or state.features is None:
                raise NapariMilError("no features yet: open a slide, tile it and extract its features first")
            if state.model is None or state.teacher is None:
                raise NapariMilError("no teacher and student yet: train with MHIM-MIL in the Retrain dock, "
                                     "or load an MHIM-MIL checkpoint in the Model dock")
            state.features.require_dim(state.model_meta["in_dim"], "the model")
            cfg = self.mhim_config()
        except NapariMilError as exc:
            self._say(str(exc), error=True)
            return None
        head = None if self.transmil_head.value < 0 else int(self.transmil_head.value)
        bag = state.features
        self.status.value = f"scoring {len(bag)} patches with the teacher and the student..."
        worker = create_worker(teacher_student_maps, state.teacher, state.model, bag, cfg, None, 0,
                               attention_layer=self.transmil_layer.value, attention_head=head, _ignore_errors=True)
        return self._start(worker, self.show_pair)

    # ---- layers ------------------------------------------------------------------------------
    def layer_names(self, panel: str) -> list[str]:
        return [f"{panel} | {part}" for part in ("slide", "attention", "ground truth", *MASK_NAMES.values())]

    def show_pair(self, maps, announce: bool = True) -> None:
        """Put the two maps in two linked panels (napari's grid mode), creating the layers the first
        time and updating them in place after. The work is spread over event-loop turns: a turn for
        each layer created (napari takes 0.1-0.4 s to create one under software OpenGL), a turn for
        each panel updated, so the viewer stays responsive while the panels fill in; a pair that arrives
        meanwhile (the Retrain dock sends one every epoch) is shown once these turns end.
        ``announce=False`` (the Retrain dock's refreshes) updates the status line without a notification."""
        teacher, student = maps
        self.maps = {"teacher": teacher, "student": student}
        if self.stepping:
            self._announce = self._announce or announce
            return
        self._announce = announce
        self._in_turns(self._pair_steps())

    def _pair_steps(self) -> list:
        """The GUI steps that show ``self.maps``: the grid and each missing layer, a step each; then
        each panel's layers updated in place, a step a panel; then the colours and the summary."""
        self._drawing = self.maps
        layers = self.viewer.layers
        missing = [(panel, part) for panel in PANELS for part, name in enumerate(self.layer_names(panel))
                   if name not in layers]
        if missing:
            self.status.value = "drawing teacher | student..."
        creating = [self._enter_grid, *(lambda p=panel, k=part: self._put_layer(p, k) for panel, part in missing)]
        return [*(creating if missing else []), *(lambda p=panel: self._update_panel(p) for panel in PANELS),
                self._pair_shown]

    def _update_panel(self, panel: str) -> None:
        self._enter_grid()
        for part in range(1, len(self.layer_names(panel))):  # the slide layer stays as it is
            self._put_layer(panel, part)

    def _enter_grid(self) -> None:
        """Hide the other layers (they come back with "Back to one view") and switch to the grid."""
        viewer = self.viewer
        ours = {name for panel in PANELS for name in self.layer_names(panel)}
        if not self._hidden:
            self._hidden = [layer for layer in viewer.layers if layer.name not in ours and layer.visible]
        for layer in self._hidden:
            if layer.visible:
                layer.visible = False
        grid = viewer.canvas.grid
        stride = len(self.layer_names("teacher"))
        if not (grid.enabled and grid.stride == stride and tuple(grid.shape) == (1, 2)):
            grid.stride = stride
            grid.shape = (1, 2)
            grid.enabled = True

    def _pair_shown(self) -> None:
        """The last step: colours, layer order, gallery, the summary; and the newest pair if one came meanwhile."""
        viewer = self.viewer
        self.restyle()
        order = [viewer.layers.index(name) for panel in PANELS for name in self.layer_names(panel)]
        if order != list(range(len(order))):
            viewer.layers.move_multiple(order, 0)
        self.build_gallery()
        self.single_button.enabled = True
        student = self.maps["student"]
        kept = int((~(student.masked["high"] | student.masked["low"] | student.masked["random"])).sum())
        counts = ", ".join(f"{int(student.masked[k].sum())} {MASK_NAMES[k]}" for k in MASK_KINDS)
        message = f"teacher | student over {len(student)} patches; the student sees {kept} ({counts})"
        if self._announce:
            self._say(message)
        else:
            self.status.value = message
        self._announce = False
        if self.maps is not self._drawing:
            self._in_turns(self._pair_steps())

    def _put_layer(self, panel: str, part: int) -> None:
        """Create or update one layer of a panel: 0 the slide, 1 the map, 2 the ground truth, 3-5 the masks."""
        from napari_mil._napari._layers import slide_layer_data

        name, amap = self.layer_names(panel)[part], self.maps[panel]
        if part == 0:
            if name not in self.viewer.layers:
                from napari.layers import Image

                data, kwargs, _ = slide_layer_data(self.state.slide)
                kwargs["name"] = name
                self._insert(panel, part, Image(data, **kwargs))
        elif part == 1:
            self._put_map(panel, name, amap)
        elif part == 2:
            self._put_truth(panel, name)
        else:
            self._put_mask(panel, name, amap, MASK_KINDS[part - 3])

    def _insert(self, panel: str, part: int, layer) -> None:
        """Insert a new layer at its place in the grid (its panel, its depth)."""
        layers = self.viewer.layers
        layers.insert(min(PANELS.index(panel) * len(self.layer_names(panel)) + part, len(layers)), layer)

    def _put_map(self, panel: str, name: str, amap) -> None:
        from napari_mil._napari._layers import map_layer, map_placement, set_changed

        if name in self.viewer.layers:  # restyle() sets its data
            set_changed(self.viewer.layers[name], **map_placement(self.state.slide, amap))
            self.viewer.layers[name].metadata["napari_mil_map"] = amap
            return
        layer = map_layer(name, self.state.slide, amap, self.norm.value, colormap=self.colormap.value,
                          opacity=self.opacity.value)
        self._insert(panel, 1, layer)

    def _ground_truth(self):
        """The open slide's ground truth, read once per slide (the maps refresh every epoch)."""
        path = self.state.slide.path
        if self._truth_of != path:
            self._truth_of, self._truth = path, ground_truth(self.state.slide)
        return self._truth

    def _put_truth(self, panel: str, name: str) -> None:
        """The tumour outline, one pixel of the ground-truth mask wide, hidden for slides without one."""
        from napari_mil._napari._layers import frame_layer, outline, set_changed, world_per_pixel

        path = self.state.slide.path
        if name in self.viewer.layers and self.viewer.layers[name].metadata.get("napari_mil_truth_of") == path:
            return  # already this slide's
        truth = self._ground_truth()
        s = world_per_pixel(self.state.slide)
        mask, ds = truth if truth is not None else (np.zeros((1, 1), bool), 1)
        kwargs = {"scale": (ds * s, ds * s), "translate": ((ds - 1) / 2 * s,) * 2}
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = outline(mask)
            set_changed(layer, **kwargs)
        else:
            layer = frame_layer(outline(mask), name, TRUTH_COLOUR, **kwargs)
            self._insert(panel, 2, layer)
        layer.visible = truth is not None
        layer.metadata["napari_mil_truth_of"] = path

    def _put_mask(self, panel: str, name: str, amap, kind: str) -> None:
        """The patches ``kind`` masked, as coloured frames: one image per mask, updated in place."""
        from napari_mil._napari._layers import frame_layer, map_placement, set_changed
        from napari_mil.heatmaps import OUTLINE_CELL

        data = amap.mask_outlines(kind)
        placement = map_placement(self.state.slide, amap, upsample=OUTLINE_CELL)
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if not np.array_equal(layer.data, data):  # a data change costs napari ~20 ms a layer
                layer.data = data
            set_changed(layer, **placement)
        else:
            layer = frame_layer(data, name, MASK_COLOURS[kind], visible=self.mask_toggles[kind].value, **placement)
            self._insert(panel, 3 + MASK_KINDS.index(kind), layer)

    def restyle(self) -> None:
        """Apply the normalisation and colour map to both maps with one shared colour bar."""
        from napari_mil._napari._layers import set_changed
        from napari_mil.heatmaps import shared_limits

        if not self.maps:
            return
        how = self.norm.value
        limits = shared_limits(list(self.maps.values()), how)
        for panel, amap in self.maps.items():
            name = self.layer_names(panel)[1]
            if name in self.viewer.layers:
                layer = self.viewer.layers[name]
                layer.data = amap.image(how)
                set_changed(layer, contrast_limits=limits, colormap=self.colormap.value)
                layer.metadata["napari_mil_norm"] = how
        self._draw_colour_bar(limits)

    def _draw_colour_bar(self, limits) -> None:
        from qtpy.QtGui import QImage, QPixmap

        from napari_mil.exports import colormap_lut

        lut = np.ascontiguousarray(np.repeat(colormap_lut(self.colormap.value)[None, :, :3], 14, axis=0))
        image = QImage(lut.data, lut.shape[1], lut.shape[0], lut.strides[0], QImage.Format.Format_RGB888)
        label = self.colour_bar.native
        label.setPixmap(QPixmap.fromImage(image.copy()).scaled(256, 14))
        label.setToolTip(f"{limits[0]:.3g} … {limits[1]:.3g}")
        self.colour_bar.label = f"{limits[0]:.3g} … {limits[1]:.3g}"

    def _set_opacity(self, value: float) -> None:
        for panel in PANELS:
            name = self.layer_names(panel)[1]
            if name in self.viewer.layers:
                self.viewer.layers[name].opacity = value

    def _toggle_mask(self, kind: str, on: bool) -> None:
        for panel in PANELS:
            name = f"{panel} | {MASK_NAMES[kind]}"
            if name in self.viewer.layers:
                self.viewer.layers[name].visible = on

    def single_view(self) -> None:
        """Leave the comparison: its layers go, the hidden ones come back."""
        self._steps.clear()  # a comparison still being built stops there
        self.viewer.canvas.grid.enabled = False
        for panel in PANELS:
            for name in self.layer_names(panel):
                if name in self.viewer.layers:
                    self.viewer.layers.remove(name)
        for layer in self._hidden:
            if layer in self.viewer.layers:
                layer.visible = True
        self._hidden, self.maps = [], {}
        self.gallery.clear()
        self.single_button.enabled = False

    # ---- hover and gallery ---------------------------------------------------------------------
    def describe(self, y_level0: float, x_level0: float) -> str:
        """What the cursor is over: each map's attention, rank and the patch's masked status."""
        if not self.maps:
            return ""
        teacher = self.maps["teacher"]
        i = teacher.patch_at(y_level0, x_level0)
        if i is None:
            return ""
        parts = [f"patch ({teacher.coords[i][0]}, {teacher.coords[i][1]})"]
        for panel, amap in self.maps.items():
            rank = round(amap.ranks()[i])
            parts.append(f"{panel}: {amap.values[i]:.2e}, rank {rank}/{len(amap)}")
        student = self.maps["student"]
        masked = [MASK_NAMES[k] for k in MASK_KINDS if student.masked.get(k) is not None and student.masked[k][i]]
        parts.append(", ".join(masked) if masked else "seen by the student")
        return " · ".join(parts)

    def close_dock(self) -> None:
        super().close_dock()
        if self._on_mouse_move in self.viewer.mouse_move_callbacks:
            self.viewer.mouse_move_callbacks.remove(self._on_mouse_move)

    def _on_mouse_move(self, viewer, event) -> None:
        from napari_mil._napari._layers import world_per_pixel

        if not self.maps or self.state.slide is None:
            return
        s = world_per_pixel(self.state.slide)
        y, x = event.position[-2] / s, event.position[-1] / s
        self.hover.value = self.describe(y, x)

    def build_gallery(self) -> None:
        """The top-k patches of each map as buttons; a click centres both views on the patch."""
        from qtpy.QtCore import QSize
        from qtpy.QtGui import QIcon, QImage, QPixmap

        self.gallery.clear()
        if not self.maps or self.state.slide is None:
            return
        slide = self.state.slide
        for panel, amap in self.maps.items():
            row = Container(layout="horizontal", labels=False, label=panel)
            row.append(Label(value=f"{panel} top {self.k.value}"))
            size0 = amap.patch_size_level0
            level = slide.best_level_for_downsample(size0 / 64)
            side = max(1, round(size0 / slide.level_downsamples[level]))
            for i in amap.top_k(self.k.value):
                x, y = (int(v) for v in amap.coords[i])
                patch = np.ascontiguousarray(slide.read_region((x, y), level, (side, side))[..., :3])
                image = QImage(patch.data, side, side, patch.strides[0], QImage.Format.Format_RGB888).copy()
                button = PushButton(text="")
                button.native.setIcon(QIcon(QPixmap.fromImage(image)))
                button.native.setIconSize(QSize(48, 48))
                button.native.setToolTip(f"{panel}: attention {amap.values[i]:.2e} at ({x}, {y})")
                button.clicked.connect(lambda *_, i=i, amap=amap: self.go_to(amap, i))
                row.append(button)
            self.gallery.append(row)

    def go_to(self, amap, index: int) -> None:
        """Centre the (linked) views on a patch, zoomed so that it fills about a quarter of the view."""
        from napari_mil._napari._layers import world_per_pixel

        s = world_per_pixel(self.state.slide)
        x, y = amap.coords[index]
        half = amap.patch_size_level0 / 2
        camera = self.viewer.scene.camera
        camera.center = ((y + half) * s, (x + half) * s)
        height, width = self.viewer.canvas.viewbox_size(self.viewer.layers)  # one panel, screen pixels
        camera.zoom = min(width, height) / (4 * amap.patch_size_level0 * s)

    # ---- exports ----------------------------------------------------------------------------------
    def export(self, fmt: str):
        """Write the pair as QuPath GeoJSON, CSV, PNG overlays or top-k patches to the export folder."""
        from napari_mil import exports

        folder = Path(self.export_folder.value)
        if not self.maps:
            self._say("nothing to export yet: show teacher | student first", error=True)
            return []
        if not str(self.export_folder.value) or folder == Path("."):
            self._say("choose an export folder first", error=True)
            return []
        slide = self.state.slide
        stem = slide.name
        try:
            if fmt == "GeoJSON":
                written = [exports.export_geojson(folder / f"{stem}_teacher_student.geojson", self.maps)]
            elif fmt == "CSV":
                written = [exports.export_csv(folder / f"{stem}_teacher_student.csv", self.maps)]
            elif fmt == "PNG":
                from napari_mil.heatmaps import shared_limits

                limits = shared_limits(list(self.maps.values()), self.norm.value)
                ds = max(slide.dimensions) / 2048
                written = [exports.export_overlay_png(folder / f"{stem}_{panel}.png", amap, slide.dimensions, ds,
                                                      how=self.norm.value, limits=limits, colormap=self.colormap.value)
                           for panel, amap in self.maps.items()]
            else:
                written = [p for amap in self.maps.values()
                           for p in exports.export_top_k(folder / f"{stem}_top{self.k.value}", slide, amap, self.k.value)]
        except (NapariMilError, OSError) as exc:
            self._say(f"export failed: {exc}", error=True)
            return []
        self._say(f"wrote {len(written)} file(s) to {folder}")
        return written
