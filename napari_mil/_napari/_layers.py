"""Layer data for napari built from core objects: slide pyramids, tissue masks, patch grids.

World coordinates are µm when the slide's mpp is known, level-0 pixels otherwise; every layer
of one slide uses the same convention, so they overlay exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # keep scipy out of the reader's import path: it is not needed to show a slide
    from napari_mil.slide.base import Slide
    from napari_mil.tiling import PatchGrid
    from napari_mil.tissue import TissueMask

# Above this many patches the grid is drawn as one dot per patch instead of outlines.
MAX_OUTLINED_PATCHES = 20_000
PATCH_COLOUR = "#00e5ff"


def world_per_pixel(slide: Slide) -> float:
    return slide.mpp if slide.mpp is not None else 1.0


def units(slide: Slide) -> str:
    return "µm" if slide.mpp is not None else "level-0 px"


def _notify_once(slide: Slide):
    """A chunk reader's error callback: the first unreadable tile of the slide becomes one
    warning notification (from any thread), later ones are shown blank without another."""
    import threading

    lock, reported = threading.Lock(), []

    def on_error(exc) -> None:
        with lock:
            if reported:
                return
            reported.append(exc)
        from napari.utils.notifications import show_warning

        show_warning(f"{exc}; unreadable tiles of {slide.name} are shown blank")

    return on_error


def slide_layer_data(slide: Slide) -> tuple:
    """(data, kwargs, "image") for a lazy multiscale RGB layer of the slide."""
    from napari_mil.slide.pyramid import dask_pyramid

    pyramid = dask_pyramid(slide, on_error=_notify_once(slide))
    s = world_per_pixel(slide)
    metadata = {
        "napari_mil": {
            "path": str(slide.path),
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "mpp_note": slide.mpp_note,
            "backend": slide.backend.name,
            "magnification": slide.magnification,
            "level_dimensions": slide.level_dimensions,
            "level_downsamples": slide.level_downsamples,
        },
        "slide": slide,
        "properties": slide.properties,
        "associated_images": slide.associated_images,
    }
    kwargs = {
        "name": slide.name,
        "rgb": True,
        "multiscale": len(pyramid) > 1,
        "scale": (s, s),
        "metadata": metadata,
        "contrast_limits": (0, 255),
    }
    data = pyramid if len(pyramid) > 1 else pyramid[0]
    return data, kwargs, "image"


def mask_layer_kwargs(slide: Slide, mask: TissueMask) -> dict:
    """scale/translate placing mask pixel centres over the level-0 pixels they summarise."""
    s = world_per_pixel(slide)
    sy, sx = mask.downsample
    return {
        "scale": (sy * s, sx * s),
        "translate": ((sy - 1) / 2 * s, (sx - 1) / 2 * s),
        "opacity": 0.35,
    }


def grid_layer_data(slide: Slide, grid: PatchGrid) -> tuple[np.ndarray, dict]:
    """Points at patch centres in world coordinates (row, col), with square outlines sized
    to the patch when the grid is small enough to read them."""
    s = world_per_pixel(slide)
    half = grid.patch_size_level0 / 2 - 0.5
    centres = (grid.coords[:, ::-1].astype(np.float64) + half) * s  # (y, x)
    outlined = len(grid) <= MAX_OUTLINED_PATCHES
    kwargs = {
        "symbol": "square" if outlined else "disc",
        "size": grid.patch_size_level0 * s if outlined else max(grid.patch_size_level0 * s / 4, 1.0),
        "face_color": "transparent" if outlined else PATCH_COLOUR,
        "border_color": PATCH_COLOUR,
        "border_width": 0.06 if outlined else 0.0,
        "border_width_is_relative": True,
        "features": {"tissue_fraction": grid.tissue_fraction, "x": grid.coords[:, 0], "y": grid.coords[:, 1]},
        "metadata": {"napari_mil_grid": grid},
        "opacity": 0.9,
    }
    return centres, kwargs


def map_placement(slide: Slide, amap, upsample: int = 1) -> dict:
    """scale/translate (world units) putting one map pixel (``upsample`` x ``upsample`` pixels) over
    each patch's grid cell."""
    s = world_per_pixel(slide)
    (sy, sx), (ty, tx) = amap.placement(upsample)
    return {"scale": (sy * s, sx * s), "translate": (ty * s, tx * s)}


def set_changed(layer, **values) -> None:
    """Set the layer attributes whose value differs: napari redoes work (transforms, shaders,
    thumbnails) on every assignment, and the maps are refreshed after every training epoch."""
    for key, value in values.items():
        current = getattr(layer, key)
        if key == "colormap":
            current, value = current.name, getattr(value, "name", value)
        try:
            same = np.array_equal(np.asarray(current, dtype=float), np.asarray(value, dtype=float))
        except (TypeError, ValueError):
            same = current == value
        if not same:
            setattr(layer, key, value)


def map_layer_kwargs(slide: Slide, amap, how: str = "minmax", limits: tuple[float, float] | None = None,
                     colormap: str = "inferno", opacity: float = 0.6) -> dict:
    """Keyword arguments of an attention map's image layer (its data is ``amap.image(how)``)."""
    from napari_mil.heatmaps import shared_limits

    return {**map_placement(slide, amap), "colormap": colormap, "contrast_limits": limits or shared_limits([amap], how),
            "opacity": opacity, "blending": "translucent"}


def map_layer(name: str, slide: Slide, amap, how: str = "minmax", limits: tuple[float, float] | None = None,
              colormap: str = "inferno", opacity: float = 0.6):
    """A new attention map image layer (NaN where there is no patch: transparent), not yet in a viewer."""
    from napari.layers import Image

    return Image(amap.image(how), name=name, metadata={"napari_mil_map": amap, "napari_mil_norm": how},
                 **map_layer_kwargs(slide, amap, how, limits, colormap, opacity))


def show_map(viewer, name: str, slide: Slide, amap, how: str = "minmax", limits: tuple[float, float] | None = None,
             colormap: str = "inferno", opacity: float = 0.6):
    """Add or update an attention map layer."""
    if name not in viewer.layers:
        layer = map_layer(name, slide, amap, how, limits, colormap, opacity)
        viewer.layers.append(layer)
        return layer
    layer = viewer.layers[name]
    layer.data = amap.image(how)
    set_changed(layer, **map_layer_kwargs(slide, amap, how, limits, colormap, opacity))
    layer.metadata["napari_mil_map"] = amap
    layer.metadata["napari_mil_norm"] = how
    return layer


def outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with a 4-neighbour outside ``mask`` (its one-pixel inner border), as uint8."""
    mask = np.asarray(mask, bool)
    inner = np.pad(mask, 1, constant_values=False)
    interior = inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
    return (mask & ~interior).astype(np.uint8)


def frame_layer(data: np.ndarray, name: str, colour: str, **kwargs):
    """An image layer drawing the non-zero pixels of ``data`` in ``colour`` and the rest transparent:
    outlines and patch frames. An image layer, not a labels layer: napari makes one five times faster."""
    from napari.layers import Image
    from napari.utils.colormaps import Colormap
    from napari.utils.colormaps.standardize_color import transform_color

    colours = Colormap([[0, 0, 0, 0], transform_color(colour)[0]], name=f"napari-mil {colour} frame",
                       interpolation="zero")
    return Image(data, name=name, colormap=colours, contrast_limits=(0, 1), opacity=1.0, blending="translucent",
                 interpolation2d="nearest", **kwargs)
