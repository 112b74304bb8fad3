"""The Compare dock: an MHIM-MIL teacher beside its hard-instance-masked student.

A form over three parts: ``_compare_layers`` (the two linked panels and their layers),
``_gallery`` (the top-k patches) and ``napari_mil.exports`` (the files). It listens to the
viewer's state: it shows every new teacher | student pair (the Retrain dock writes one after
every epoch), and computes the pair of a new teacher and student, or of new features, itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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

from napari_mil._napari._compare_layers import PANELS, MapStyle, PairLayers, layer_names
from napari_mil._napari._gallery import Gallery
from napari_mil._napari._state import MapPair
from napari_mil._napari._workers import DockBase
from napari_mil.errors import NapariMilError
from napari_mil.exports import PAIR_FORMATS
from napari_mil.heatmaps import MASK_KINDS, MASK_LABELS, NORMALISATION_LABELS

if TYPE_CHECKING:
    import napari

NORM_LABELS = [(label, how) for how, label in NORMALISATION_LABELS.items()]


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
        self.mask_toggles = {kind: CheckBox(text=MASK_LABELS[kind], value=True) for kind in MASK_KINDS}
        self.colour_bar = Label(value="")
        self.hover = Label(value="")
        self.k = SpinBox(label="Top k", value=6, min=1, max=32)
        self.gallery = Gallery(self, self.go_to)
        self.export_folder = FileEdit(label="Export to", mode="d")
        export_row = Container(layout="horizontal", labels=False)
        self.export_buttons = {fmt: PushButton(text=fmt) for fmt in PAIR_FORMATS}
        export_row.extend(list(self.export_buttons.values()))
        self.status.value = "Needs a teacher and a student: train with MHIM-MIL (Retrain dock) or load an MHIM-MIL checkpoint."
        self.extend([self.preset, self.ratio_h, self.show_button, self.single_button, self.norm, self.colormap,
                     self.opacity, self.transmil_layer, self.transmil_head, *self.mask_toggles.values(),
                     self.colour_bar, self.hover, self.k, self.gallery, self.export_folder, export_row, self.status])
        self.hover.native.setWordWrap(True)
        self.layers = PairLayers(napari_viewer)
        self.maps: dict = {}  # panel -> AttentionMap
        self._drawing: dict = {}  # the maps the GUI steps under way show
        self._announce = False  # whether the pair under way ends with a notification
        self._asked = 0  # the newest comparison asked for: older ones are dropped
        self.show_button.clicked.connect(self.compare)
        self.single_button.clicked.connect(self.single_view)
        self.norm.changed.connect(lambda _: self.restyle())
        self.colormap.changed.connect(lambda _: self.restyle())
        self.opacity.changed.connect(self.layers.set_opacity)
        self.transmil_layer.changed.connect(lambda _: self.maps and self.compare())
        self.transmil_head.changed.connect(lambda _: self.maps and self.compare())
        for kind, box in self.mask_toggles.items():
            box.changed.connect(lambda on, kind=kind: self.layers.show_mask(kind, on))
        self.k.changed.connect(lambda _: self.build_gallery())
        for fmt, button in self.export_buttons.items():
            button.clicked.connect(lambda *_, fmt=fmt: self.export(fmt))
        self.viewer.mouse_move_callbacks.append(self._on_mouse_move)
        self.native.setMaximumWidth(460)
        events = self.state.events
        self.listen(events.pair, self._on_pair)
        self.listen(events.model, self._on_model)
        self.listen(events.features, self._on_features)
        if self.state.pair is not None:  # opened after a pair was made: show it
            self._on_pair(self.state.pair)
        elif self._has_pair_inputs():
            self.compare()

    # ---- the state ---------------------------------------------------------------------------
    def _has_pair_inputs(self) -> bool:
        state = self.state
        return all(x is not None for x in (state.slide, state.features, state.model, state.teacher))

    def _on_pair(self, pair: MapPair | None) -> None:
        if pair is not None and self.state.slide is not None:
            self.show_pair((pair.teacher, pair.student), announce=pair.announce)

    def _on_model(self, model) -> None:
        if self._has_pair_inputs():
            self.compare()

    def _on_features(self, bag) -> None:
        if self.maps and self._has_pair_inputs():  # the pair shown is of other features now
            self.compare()

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
        """Compute the teacher's and the student's maps in a worker and put them in the state, which
        shows them; a newer comparison asked for meanwhile replaces this one."""
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
        self._asked += 1
        asked = self._asked
        self.status.value = f"scoring {len(bag)} patches with the teacher and the student..."
        worker = create_worker(teacher_student_maps, state.teacher, state.model, bag, cfg, None, 0,
                               attention_layer=self.transmil_layer.value, attention_head=head, _ignore_errors=True)
        return self._start(worker, lambda maps: self._computed(asked, maps))

    def _computed(self, asked: int, maps) -> None:
        if asked == self._asked:
            self.state.pair = MapPair(*maps, announce=True)

    # ---- showing it ------------------------------------------------------------------------------
    def layer_names(self, panel: str) -> list[str]:
        return layer_names(panel)

    def style(self) -> MapStyle:
        return MapStyle(self.norm.value, self.colormap.value, self.opacity.value,
                        {kind: box.value for kind, box in self.mask_toggles.items()})

    def show_pair(self, maps, announce: bool = True) -> None:
        """Put the two maps in two linked panels (napari's grid mode), creating the layers the first
        time and updating them in place after. The work is spread over event-loop turns: a turn for
        each layer created, a turn for each panel updated, so the viewer stays responsive while the
        panels fill in; a pair that arrives meanwhile (one every epoch while a model trains) is shown
        once these turns end. ``announce=False`` updates the status line without a notification."""
        teacher, student = maps
        self.maps = {"teacher": teacher, "student": student}
        if self.stepping:
            self._announce = self._announce or announce
            return
        self._announce = announce
        self._in_turns(self._pair_steps())

    def _pair_steps(self) -> list:
        """The GUI steps that show ``self.maps``: the grid and each missing layer, a step each; then
        each panel's layers updated in place, a step a panel; then the colours and the summary.
        Each step reads the newest maps when it runs."""
        self._drawing = self.maps
        missing = self.layers.missing()
        if missing:
            self.status.value = "drawing teacher | student..."
        creating = [self.layers.enter_grid,
                    *(lambda p=panel, k=part: self.layers.put(p, k, self.state.slide, self.maps[p], self.style())
                      for panel, part in missing)]
        updating = [lambda p=panel: self.layers.update_panel(p, self.state.slide, self.maps[p], self.style())
                    for panel in PANELS]
        return [*(creating if missing else []), *updating, self._pair_shown]

    def _pair_shown(self) -> None:
        """The last step: colours, layer order, gallery, the summary; and the newest pair if one came meanwhile."""
        self.restyle()
        self.layers.order()
        self.build_gallery()
        self.single_button.enabled = True
        student = self.maps["student"]
        kept = int((~(student.masked["high"] | student.masked["low"] | student.masked["random"])).sum())
        counts = ", ".join(f"{int(student.masked[k].sum())} {MASK_LABELS[k]}" for k in MASK_KINDS)
        message = f"teacher | student over {len(student)} patches; the student sees {kept} ({counts})"
        if self._announce:
            self._say(message)
        else:
            self.status.value = message
        self._announce = False
        if self.maps is not self._drawing:
            self._in_turns(self._pair_steps())

    def restyle(self) -> None:
        """Apply the normalisation and colour map to both maps with one shared colour bar."""
        if self.maps:
            self._draw_colour_bar(self.layers.restyle(self.maps, self.style()))

    def _draw_colour_bar(self, limits) -> None:
        import numpy as np
        from qtpy.QtGui import QImage, QPixmap

        from napari_mil.exports import colormap_lut

        lut = np.ascontiguousarray(np.repeat(colormap_lut(self.colormap.value)[None, :, :3], 14, axis=0))
        image = QImage(lut.data, lut.shape[1], lut.shape[0], lut.strides[0], QImage.Format.Format_RGB888)
        label = self.colour_bar.native
        label.setPixmap(QPixmap.fromImage(image.copy()).scaled(256, 14))
        label.setToolTip(f"{limits[0]:.3g} … {limits[1]:.3g}")
        self.colour_bar.label = f"{limits[0]:.3g} … {limits[1]:.3g}"

    def single_view(self) -> None:
        """Leave the comparison: its layers go, the hidden ones come back."""
        self._steps.clear()  # a comparison still being built stops there
        self.layers.leave()
        self.maps = {}
        self.gallery.reset()
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
        masked = [MASK_LABELS[k] for k in MASK_KINDS if student.masked.get(k) is not None and student.masked[k][i]]
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
        """The top-k patches of each map as buttons, read in a worker; a click centres both views on the patch."""
        if not self.maps or self.state.slide is None:
            self.gallery.reset()
            return
        self.gallery.request(self.state.slide, self.maps, self.k.value)

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
        from napari_mil.exports import export_pair

        folder = Path(self.export_folder.value)
        if not self.maps:
            self._say("nothing to export yet: show teacher | student first", error=True)
            return []
        if not str(self.export_folder.value) or folder == Path("."):
            self._say("choose an export folder first", error=True)
            return []
        try:
            written = export_pair(folder, fmt, self.state.slide, self.maps, self.norm.value, self.colormap.value,
                                  self.k.value)
        except (NapariMilError, OSError) as exc:
            self._say(f"export failed: {exc}", error=True)
            return []
        self._say(f"wrote {len(written)} file(s) to {folder}")
        return written
