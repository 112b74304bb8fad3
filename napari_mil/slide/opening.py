"""Opening a slide: OpenSlide first, the tifffile backend for what OpenSlide cannot read."""

from __future__ import annotations

import os
from pathlib import Path

from napari_mil.errors import InvalidMppError, SlideOpenError
from napari_mil.slide import openslide_backend, tiff_backend
from napari_mil.slide.base import SLIDE_EXTENSIONS, Slide, is_slide_path, validate_mpp
from napari_mil.slide.tiff_header import check_tiff_header


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open a slide with OpenSlide, falling back to tifffile for plain and OME TIFF.

    ``mpp`` overrides the file's value (for slides that record none or a wrong one).
    Raises SlideOpenError with a one-line reason when the file cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise SlideOpenError(f"{path} does not exist")
    if path.is_dir() and not any(path.glob("*.dcm")):
        raise SlideOpenError(f"{path} is a folder, not a slide (DICOM WSI folders hold .dcm files)")
    if not path.is_dir() and not is_slide_path(path):
        raise SlideOpenError(
            f"{path.name}: unsupported format; napari-mil opens {', '.join(SLIDE_EXTENSIONS)}"
        )
    if mpp is not None:
        mpp = validate_mpp(mpp, "the given mpp")

    # header values OpenSlide would trust blindly (a tile's size) can make it abort the process
    check_tiff_header(path)
    errors = []
    backend = None
    for module in (openslide_backend, tiff_backend):
        if not module.can_try(path):
            continue
        try:
            backend = module.open_backend(path)
            break
        except SlideOpenError as exc:
            errors.append(str(exc))
    if backend is None:
        reason = "; ".join(errors) if errors else "no reader accepts this file"
        raise SlideOpenError(f"{path.name} is not a readable slide: {reason}")

    if mpp is not None:
        return Slide(path, backend, mpp, "user")
    recorded = backend.recorded_mpp
    if recorded is None:
        return Slide(path, backend, None, "missing", "the file has no resolution metadata")
    try:
        return Slide(path, backend, validate_mpp(recorded, "recorded mpp"), "slide")
    except InvalidMppError as exc:
        return Slide(path, backend, None, "missing", str(exc))
