"""The layers of the teacher | student comparison.

The two maps sit in napari's grid mode, one viewbox each with one shared camera, so they pan
and zoom together. Each panel holds the same six layers, bottom to top: the slide, the map,
the ground truth's tumour outline (when the slide has one), and the random-high, low and random
masks as patch outlines. Other layers are hidden while the comparison is shown and come back after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_mil.heatmaps import MASK_KINDS, MASK_LABELS

PANELS = ("teacher", "student")
MASK_COLOURS = {"high": "#ff2d95", "low": "#2f9bff", "random": "#c8c8c8"}
TRUTH_COLOUR = "#39ff14"  # the tumour outline
PARTS = ("slide", "attention", "ground truth", *MASK_LABELS.values())


def ground_truth(slide):
    """(tumour mask, downsample) of a synthetic slide, or None for slides without ground truth."""
    from napari_mil.synthetic import SyntheticSlide

    try:
        info = SyntheticSlide.load(slide.path)
        return info.tumour_mask(), info.mask_downsample
    except (OSError, ValueError, TypeError, KeyError):
        return None


def layer_names(panel: str) -> list[str]:
    return [f"{panel} | {part}" for part in PARTS]


@dataclass
class MapStyle:
    """How the maps are drawn: the Compare dock's display fields."""

    norm: str = "minmax"
    colormap: str = "inferno"
    opacity: float = 0.6
    masks_shown: dict = field(default_factory=lambda: dict.fromkeys(MASK_KINDS, True))


class PairLayers:
    """Creates, updates and removes the comparison's layers in a viewer. Each method is one piece
    of GUI work short enough for an event-loop turn; the Compare dock decides the order."""

    def __init__(self, viewer):
        self.viewer = viewer
        self._hidden: list = []  # layers hidden while comparing
        self._truth_of, self._truth = None, None  # the slide whose ground truth was read, and it

    def missing(self) -> list[tuple[str, int]]:
        """(panel, part) of the layers not created yet."""
        return [(panel, part) for panel in PANELS for part, name in enumerate(layer_names(panel))
                if name not in self.viewer.layers]

    def enter_grid(self) -> None:
        """Hide the other layers (they come back with ``leave``) and switch to the grid."""
        viewer = self.viewer
        ours = {name for panel in PANELS for name in layer_names(panel)}
        if not self._hidden:
            self._hidden = [layer for layer in viewer.layers if layer.name not in ours and layer.visible]
        for layer in self._hidden:
            if layer.visible:
                layer.visible = False
        grid = viewer.canvas.grid
        stride = len(PARTS)
        if not (grid.enabled and grid.stride == stride and tuple(grid.shape) == (1, 2)):
            grid.stride = stride
            grid.shape = (1, 2)
            grid.enabled = True

    def update_panel(self, panel: str, slide, amap, style: MapStyle) -> None:
        """Every layer of a panel, in place (the slide's only when the slide changed)."""
        self.enter_grid()
        for part in range(len(PARTS)):
            self.put(panel, part, slide, amap, style)

    def put(self, panel: str, part: int, slide, amap, style: MapStyle) -> None:
        """Create or update one layer of a panel: 0 the slide, 1 the map, 2 the ground truth, 3-5 the masks."""
        from napari_mil._napari._layers import slide_layer_data

        name = layer_names(panel)[part]
        if part == 0:
            layers = self.viewer.layers
            if name in layers and layers[name].metadata.get("slide") is not slide:  # another slide's
                layers.remove(name)
            if name not in layers:
                from napari.layers import Image

                data, kwargs, _ = slide_layer_data(slide)
                kwargs["name"] = name
                self._insert(panel, part, Image(data, **kwargs))
        elif part == 1:
            self._put_map(panel, name, slide, amap, style)
        elif part == 2:
            self._put_truth(panel, name, slide)
        else:
            self._put_mask(panel, name, slide, amap, MASK_KINDS[part - 3], style)

    def order(self) -> None:
        """The comparison's layers at the bottom of the list, in panel order."""
        layers = self.viewer.layers
        order = [layers.index(name) for panel in PANELS for name in layer_names(panel)]
        if order != list(range(len(order))):
            layers.move_multiple(order, 0)

    def _insert(self, panel: str, part: int, layer) -> None:
        """Insert a new layer at its place in the grid (its panel, its depth)."""
        layers = self.viewer.layers
        layers.insert(min(PANELS.index(panel) * len(PARTS) + part, len(layers)), layer)

    def _put_map(self, panel: str, name: str, slide, amap, style: MapStyle) -> None:
        from napari_mil._napari._layers import map_layer, map_placement, set_changed

        if name in self.viewer.layers:  # restyle() sets its data
            set_changed(self.viewer.layers[name], **map_placement(slide, amap))
            self.viewer.layers[name].metadata["napari_mil_map"] = amap
            return
        layer = map_layer(name, slide, amap, style.norm, colormap=style.colormap, opacity=style.opacity)
        self._insert(panel, 1, layer)

    def _ground_truth(self, slide):
        """The slide's ground truth, read once per slide (the maps refresh every epoch)."""
        if self._truth_of != slide.path:
            self._truth_of, self._truth = slide.path, ground_truth(slide)
        return self._truth

    def _put_truth(self, panel: str, name: str, slide) -> None:
        """The tumour outline, one pixel of the ground-truth mask wide, hidden for slides without one."""
        from napari_mil._napari._layers import frame_layer, outline, set_changed, world_per_pixel

        if name in self.viewer.layers and self.viewer.layers[name].metadata.get("napari_mil_truth_of") == slide.path:
            return  # already this slide's
        truth = self._ground_truth(slide)
        s = world_per_pixel(slide)
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
        layer.metadata["napari_mil_truth_of"] = slide.path

    def _put_mask(self, panel: str, name: str, slide, amap, kind: str, style: MapStyle) -> None:
        """The patches ``kind`` masked, as coloured frames: one image per mask, updated in place."""
        from napari_mil._napari._layers import frame_layer, map_placement, set_changed
        from napari_mil.heatmaps import OUTLINE_CELL

        data = amap.mask_outlines(kind)
        placement = map_placement(slide, amap, upsample=OUTLINE_CELL)
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if not np.array_equal(layer.data, data):  # a data change is costly: skip it when nothing changed
                layer.data = data
            set_changed(layer, **placement)
        else:
            layer = frame_layer(data, name, MASK_COLOURS[kind], visible=style.masks_shown[kind], **placement)
            self._insert(panel, 3 + MASK_KINDS.index(kind), layer)

    def restyle(self, maps: dict, style: MapStyle) -> tuple[float, float]:
        """The normalisation and colour map applied to the maps with one shared range, returned."""
        from napari_mil._napari._layers import set_changed
        from napari_mil.heatmaps import shared_limits

        limits = shared_limits(list(maps.values()), style.norm)
        for panel, amap in maps.items():
            name = layer_names(panel)[1]
            if name in self.viewer.layers:
                layer = self.viewer.layers[name]
                layer.data = amap.image(style.norm)
                set_changed(layer, contrast_limits=limits, colormap=style.colormap)
                layer.metadata["napari_mil_norm"] = style.norm
        return limits

    def set_opacity(self, value: float) -> None:
        for panel in PANELS:
            name = layer_names(panel)[1]
            if name in self.viewer.layers:
                self.viewer.layers[name].opacity = value

    def show_mask(self, kind: str, on: bool) -> None:
        for panel in PANELS:
            name = f"{panel} | {MASK_LABELS[kind]}"
            if name in self.viewer.layers:
                self.viewer.layers[name].visible = on

    def leave(self) -> None:
        """Back to one view: the comparison's layers go, the hidden ones come back."""
        self.viewer.canvas.grid.enabled = False
        for panel in PANELS:
            for name in layer_names(panel):
                if name in self.viewer.layers:
                    self.viewer.layers.remove(name)
        for layer in self._hidden:
            if layer in self.viewer.layers:
                layer.visible = True
        self._hidden = []
