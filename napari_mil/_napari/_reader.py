"""napari reader contribution: whole-slide images as one lazy multiscale image layer."""

from __future__ import annotations

import os

from napari_mil.slide.base import is_slide_path


def napari_get_reader(path):
    """Return a reader for slide files (or a DICOM WSI folder), None for anything else."""
    if isinstance(path, (list, tuple)):
        if not path:
            return None
        if not all(_accepts(p) for p in path):
            return None
    elif not _accepts(path):
        return None
    return read_slides


def _accepts(path) -> bool:
    path = os.fspath(path)
    if os.path.isdir(path):
        return any(name.lower().endswith(".dcm") for name in os.listdir(path))
    return is_slide_path(path)


def read_slides(path):
    """Open each slide; errors propagate as SlideOpenError with a one-line reason, which napari
    shows as a notification while the viewer keeps running."""
    from napari_mil._napari._layers import slide_layer_data
    from napari_mil.slide import open_slide

    paths = path if isinstance(path, (list, tuple)) else [path]
    layers = []
    for p in paths:
        slide = open_slide(p)
        if slide.mpp is None:
            _warn_missing_mpp(slide)
        layers.append(slide_layer_data(slide))
    return layers


def _warn_missing_mpp(slide) -> None:
    try:
        from napari.utils.notifications import show_warning
    except ImportError:  # pragma: no cover - napari is a dependency
        return
    show_warning(
        f"{slide.path.name}: no usable µm per pixel ({slide.mpp_note}); it is shown in pixels. "
        "Enter the mpp in the Slide & tissue dock before detecting tissue."
    )
