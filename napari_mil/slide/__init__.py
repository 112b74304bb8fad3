"""Opening whole-slide images: OpenSlide first, tifffile as the fallback."""

from napari_mil.slide.base import (
    MPP_RANGE,
    SLIDE_EXTENSIONS,
    Slide,
    is_slide_path,
    validate_mpp,
)
from napari_mil.slide.opening import open_slide

__all__ = ["MPP_RANGE", "SLIDE_EXTENSIONS", "Slide", "is_slide_path", "open_slide", "validate_mpp"]
