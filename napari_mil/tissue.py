"""Tissue detection at thumbnail scale: HSV saturation, Otsu, median, closing, holes, small objects.

Every size is physical (µm or µm²) and converted to mask pixels with the slide's mpp, so the
defaults behave the same on a small single-level biopsy scan and on a 100k-pixel resection.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_mil.atomic import atomic_path
from napari_mil.errors import MemoryCapError, NoTissueError
from napari_mil.slide.base import Slide
from napari_mil.slide.thumbnail import read_downsampled


@dataclass(frozen=True)
class TissueParams:
    """Parameters of the saturation/Otsu tissue detector (sizes in µm, areas in µm²)."""

    mask_mpp: float = 8.0  # µm per mask pixel (the "thumbnail scale")
    saturation_threshold: int | None = None  # 0-255; None: Otsu, never below min_saturation
    min_saturation: int = 15  # floor under Otsu: blank glass has saturation ~0-10
    median_um: float = 56.0  # side of the median filter window
    close_um: float = 24.0  # radius of the morphological closing
    min_tissue_area_um2: float = 20_000.0  # smaller fragments are dropped (0.02 mm²)
    max_hole_area_um2: float = 50_000.0  # holes up to this size are filled; larger lumens kept
    exclude_pen: bool = True  # blue and green ink (hue 70-245°) is not tissue
    dark_value: int = 40  # pixels darker than this (V, 0-255) are debris or black ink
    max_pixels: int = 50_000_000  # refuse thumbnails above this (a 25 x 75 mm glass at 8 µm/px is 29 Mpx)


PRESETS: dict[str, TissueParams] = {
    # needle cores and small fragments: keep small pieces, close gently
    "biopsy": TissueParams(min_tissue_area_um2=5_000.0, close_um=16.0, max_hole_area_um2=20_000.0),
    # large sections: ignore crumbs, bridge small gaps, keep big lumens open
    "resection": TissueParams(min_tissue_area_um2=100_000.0, close_um=40.0, max_hole_area_um2=200_000.0),
}


@dataclass(eq=False)
class TissueMask:
    """Boolean tissue mask at thumbnail scale and its mapping to level 0.

    Mask pixel (i, j) covers level-0 pixels [i*sy, (i+1)*sy) x [j*sx, (j+1)*sx), where
    ``downsample = (sy, sx)`` is level-0 pixels per mask pixel.
    """

    mask: np.ndarray  # (H, W) bool
    downsample: tuple[float, float]  # (sy, sx) level-0 pixels per mask pixel
    params: dict = field(default_factory=dict)

    @property
    def tissue_area_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def save(self, path: str | os.PathLike) -> Path:
        """Write the mask as a PNG (255 = tissue), atomically, with the scale in its text chunk."""
        from PIL import Image, PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_text("napari_mil.downsample", f"{self.downsample[0]!r},{self.downsample[1]!r}")
        with atomic_path(path) as tmp:
            Image.fromarray(self.mask.astype(np.uint8) * 255).save(tmp, format="PNG", pnginfo=info)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, slide_dimensions: tuple[int, int] | None = None) -> TissueMask:
        """Read a mask PNG written by ``save`` (or any mask, given the slide's level-0 size)."""
        from PIL import Image

        with Image.open(path) as im:
            text = im.info.get("napari_mil.downsample")
            mask = np.asarray(im.convert("L")) > 127
        if text:
            sy, sx = (float(v) for v in text.split(","))
        elif slide_dimensions is not None:
            sy, sx = slide_dimensions[1] / mask.shape[0], slide_dimensions[0] / mask.shape[1]
        else:
            raise ValueError(f"{path} records no scale; give the slide's level-0 dimensions")
        return cls(mask, (sy, sx))


# Bytes held per thumbnail pixel while a mask is made: the RGB thumbnail, segment_tissue's
# channels, filters and labels (35 measured), the mask.
BYTES_PER_THUMBNAIL_PIXEL = 40


def read_thumbnail(slide: Slide, mask_mpp: float,
                   max_pixels: int = TissueParams.max_pixels) -> tuple[np.ndarray, tuple[float, float]]:
    """RGB image of the whole slide at about ``mask_mpp`` µm/px, and its (sy, sx) downsample.

    Reads the coarsest pyramid level that is at least as fine as the target, region by region,
    box-averaging each into the thumbnail: memory stays bounded even when the only level is
    the full-resolution one. A thumbnail above ``max_pixels`` is refused before any reading.
    """
    mpp = slide.require_mpp()
    w0, h0 = slide.dimensions
    target_ds = max(mask_mpp / mpp, 1.0)
    out_w, out_h = max(1, int(np.ceil(w0 / target_ds))), max(1, int(np.ceil(h0 / target_ds)))
    if out_w * out_h > max_pixels:
        gib = out_w * out_h * BYTES_PER_THUMBNAIL_PIXEL / 2**30
        raise MemoryCapError(
            f"{slide.name}: the tissue thumbnail at {mask_mpp:g} µm/px would be {out_w} x {out_h} px "
            f"(about {gib:.1f} GiB to segment), above max_pixels={max_pixels:,}; check the slide's µm per pixel "
            f"({mpp:g}), use a coarser mask_mpp, or raise max_pixels (a TissueParams field, "
            "detect_tissue(..., max_pixels=N))"
        )
    level = slide.best_level_for_downsample(target_ds)
    img = read_downsampled(slide, level, (out_w, out_h))
    return img, (h0 / out_h, w0 / out_w)


def _otsu(values: np.ndarray) -> int:
    """Otsu threshold of uint8 values (the smallest t with values > t as foreground)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    mean0 = np.divide(m0, w0, out=np.zeros(256), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros(256), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return int(np.argmax(between))


def hsv_channels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees (float32), saturation and value as uint8 0-255."""
    rgb16 = rgb.astype(np.int16)
    mx = rgb16.max(axis=-1)
    mn = rgb16.min(axis=-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta.astype(np.int32) * 255 // np.maximum(mx, 1), 0).astype(np.uint8)  # int16 overflows
    r, g, b = rgb16[..., 0], rgb16[..., 1], rgb16[..., 2]
    d = np.maximum(delta, 1).astype(np.float32)
    hue = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60.0
    hue = np.where(delta == 0, 0.0, hue).astype(np.float32)
    return hue, sat, mx.astype(np.uint8)


def _box_median(mask: np.ndarray, size: int) -> np.ndarray:
    """Median filter of a binary image with a size x size window (a majority vote).

    Thresholding commutes with the median, so this equals a median blur of the saturation
    followed by the threshold, at the cost of one box filter.
    """
    if size <= 1:
        return mask
    votes = ndimage.uniform_filter(mask.astype(np.float32), size=size, mode="nearest")
    return votes > 0.5


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return xx * xx + yy * yy <= radius * radius


def segment_tissue(rgb: np.ndarray, pixel_um: float, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail whose pixels are ``pixel_um`` µm wide."""
    hue, sat, val = hsv_channels(rgb)
    ink = np.zeros(sat.shape, bool)
    if params.exclude_pen:
        ink = (hue >= 70) & (hue <= 245) & (sat > 90)
    dark = val < params.dark_value
    glass_or_tissue = ~(ink | dark)
    if params.saturation_threshold is not None:
        threshold = int(params.saturation_threshold)
    else:
        threshold = max(_otsu(sat[glass_or_tissue]), params.min_saturation)
    mask = (sat > threshold) & glass_or_tissue

    median_px = int(round(params.median_um / pixel_um)) | 1  # odd window
    mask = _box_median(mask, median_px)
    close_px = int(round(params.close_um / pixel_um))
    if close_px >= 1:
        # pad so that closing does not glue tissue to the image border
        padded = np.pad(mask, close_px)
        padded = ndimage.binary_closing(padded, structure=_disk(close_px))
        mask = padded[close_px:-close_px, close_px:-close_px]
    mask &= ~(ink | dark)  # closing must not pull ink back in

    px_area = pixel_um * pixel_um
    filled = ndimage.binary_fill_holes(mask)
    holes = filled & ~mask
    if holes.any():
        labels, n = ndimage.label(holes)
        sizes = np.bincount(labels.ravel(), minlength=n + 1) * px_area
        small = sizes <= params.max_hole_area_um2
        small[0] = False
        mask = mask | small[labels]
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1) * px_area
        keep = sizes >= params.min_tissue_area_um2
        keep[0] = False
        mask = keep[labels]
    return mask


def detect_tissue(slide: Slide, params: TissueParams | str = "resection", **overrides) -> TissueMask:
    """Detect tissue on a slide; ``params`` is a TissueParams or a preset name.

    Returns an empty mask when there is no tissue (``require_tissue`` raises for callers that
    need some), so the user can still paint tissue in by hand.
    """
    if isinstance(params, str):
        if params not in PRESETS:
            raise ValueError(f"unknown tissue preset {params!r}; choose one of {', '.join(PRESETS)}")
        params = PRESETS[params]
    if overrides:
        params = replace(params, **overrides)
    thumb, (sy, sx) = read_thumbnail(slide, params.mask_mpp, params.max_pixels)
    pixel_um = slide.require_mpp() * (sy + sx) / 2
    mask = segment_tissue(thumb, pixel_um, params)
    return TissueMask(mask, (sy, sx), asdict(params))


def require_tissue(mask: TissueMask, slide_name: str = "slide") -> None:
    if not mask.mask.any():
        raise NoTissueError(
            f"no tissue found on {slide_name}: try the 'biopsy' preset, lower the saturation "
            "threshold, or paint the tissue into the mask layer"
        )
