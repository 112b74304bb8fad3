"""Cartoon synthetic H&E slides with known ground truth: easy to learn, for demos and tests.

A slide is a pyramidal, tiled, JPEG-compressed TIFF that OpenSlide reads as a generic TIFF:
level 0 and its downsampled levels are consecutive pages, and the resolution tags record the
µm per pixel. Beside ``name.tif`` the generator writes the ground truth:

- ``name.tissue.png``, ``name.tumour.png`` and ``name.artefacts.png`` (pen and debris): masks
  at ``mask_downsample`` (one mask pixel per ``mask_downsample`` level-0 pixels), 255 inside;
- ``name.json``: geometry, seed, the tumour fraction of the tissue and the slide label.

Content is drawn from smooth random fields (tissue pieces, tumour regions) and a bank of
texture tiles: pink fibrous stroma with sparse spindle nuclei, and tumour with dense, large,
pleomorphic dark nuclei. Optional pen strokes and dark debris sit on the glass, outside the
tissue ground truth, so tissue detection can be checked against them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_mil.synthetic.fields import (
    BACKGROUND,
    PEN_COLOURS,
    nuclei_layer,
    sharpen,
    smooth_noise,
    stroke,
    tissue_field,
    upsample,
)
from napari_mil.synthetic.files import (
    MASK_DOWNSAMPLE,
    SyntheticSlide,
    cohort_plan,
    cohort_row,
    write_ground_truth,
    write_labels,
    write_pyramid,
)

STROMA = np.array([233, 168, 200], np.float32)
TUMOUR_CYTOPLASM = np.array([205, 140, 190], np.float32)
HEMATOXYLIN = np.array([75, 45, 125], np.float32)
DEBRIS = np.array([35, 30, 30], np.float32)


def _tumour_field(rng, tissue: np.ndarray, burden: float, mpp: float) -> np.ndarray:
    """Boolean tumour mask inside the tissue, covering ``burden`` of the tissue area."""
    tumour = np.zeros_like(tissue)
    n_tissue = int(tissue.sum())
    if burden <= 0 or n_tissue == 0:
        return tumour
    target = max(1, int(round(burden * n_tissue)))
    # distance to the tissue edge, so lesions sit inside the tissue
    inside = ndimage.distance_transform_edt(tissue)
    if burden < 0.03:
        # rare tiny lesion(s): one or two round foci
        foci = 1 if burden < 0.01 else 2
        area = target / foci
        radius = math.sqrt(area / math.pi)
        candidates = np.argwhere(inside > radius + 1)
        if len(candidates) == 0:
            candidates = np.argwhere(tissue)
        yy, xx = np.mgrid[0 : tissue.shape[0], 0 : tissue.shape[1]]
        for _ in range(foci):
            cy, cx = candidates[rng.integers(len(candidates))]
            tumour |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        return tumour & tissue
    noise = smooth_noise(rng, tissue.shape, sigma=max(tissue.shape) / 24)
    score = noise + 0.15 * inside / (inside.max() + 1e-6)
    threshold = np.quantile(score[tissue], 1.0 - min(burden, 0.95))
    return (score >= threshold) & tissue


def _texture_bank(rng, size: int, mpp: float, n: int = 6):
    """(stroma, tumour) lists of float32 RGB tiles of ``size`` px at ``mpp``."""
    um = 1.0 / mpp  # pixels per µm
    area_um2 = (size / um) ** 2
    stroma_tiles, tumour_tiles = [], []
    for _ in range(n):
        fibres = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), (0.8 * um, 6 * um), mode="wrap")
        fibres = fibres / (fibres.std() + 1e-6)
        base = STROMA[None, None, :] * (1.0 + 0.05 * fibres[..., None])
        nuc = nuclei_layer(rng, size, int(area_um2 / 900), (2.0 * um, 3.0 * um), (2.0, 3.5))
        stroma = base * (1 - nuc[..., None]) + HEMATOXYLIN * 1.15 * nuc[..., None]
        stroma_tiles.append(stroma.astype(np.float32))

        grain = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 1.5 * um, mode="wrap")
        grain = grain / (grain.std() + 1e-6)
        base = TUMOUR_CYTOPLASM[None, None, :] * (1.0 + 0.04 * grain[..., None])
        nuc = nuclei_layer(rng, size, int(area_um2 / 110), (4.0 * um, 7.0 * um), (1.0, 1.6))
        dark = HEMATOXYLIN * rng.uniform(0.7, 0.85)
        tumour = base * (1 - nuc[..., None]) + dark * nuc[..., None]
        tumour_tiles.append(tumour.astype(np.float32))
    return stroma_tiles, tumour_tiles


# ---- writer -----------------------------------------------------------------------------
def make_synthetic_slide(
    path: str | os.PathLike,
    width: int = 16384,
    height: int = 12288,
    mpp: float = 0.25,
    seed: int = 0,
    tumour_burden: float = 0.15,
    tissue_pieces: int = 1,
    pen_marks: bool = False,
    debris: bool = False,
    tile: int = 512,
    jpeg_quality: int = 80,
    workers: int | None = None,
) -> SyntheticSlide:
    """Write a synthetic H&E slide and its ground truth; return what was written.

    ``tumour_burden`` is the fraction of the tissue area that is tumour: 0 makes a
    tumour-free slide, values below 0.03 make one or two tiny round foci.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if width < tile or height < tile:
        raise ValueError(f"slide {width}x{height} is smaller than one {tile}px tile")
    rng = np.random.default_rng(seed)
    ds = MASK_DOWNSAMPLE
    field_shape = (math.ceil(height / ds), math.ceil(width / ds))
    tissue = tissue_field(rng, field_shape, tissue_pieces)
    tumour = _tumour_field(rng, tissue, tumour_burden, mpp)
    glass_px = 1.0 / (mpp * ds)  # mask pixels per µm
    pen = np.zeros(field_shape, bool)
    if pen_marks:
        pen = stroke(field_shape, rng, width_px=max(2.0, 250 * glass_px)) & ~ndimage.binary_dilation(tissue, iterations=2)
    specks = np.zeros(field_shape, bool)
    if debris:
        for _ in range(6):
            cy, cx = rng.integers(0, field_shape[0]), rng.integers(0, field_shape[1])
            r = max(1.0, rng.uniform(60, 150) * glass_px)
            yy, xx = np.ogrid[: field_shape[0], : field_shape[1]]
            specks |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        specks &= ~ndimage.binary_dilation(tissue | pen, iterations=3)

    tissue_f = ndimage.gaussian_filter(tissue.astype(np.float32), 0.7)
    tumour_f = ndimage.gaussian_filter(tumour.astype(np.float32), 0.7)
    pen_f = ndimage.gaussian_filter(pen.astype(np.float32), 0.7)
    speck_f = ndimage.gaussian_filter(specks.astype(np.float32), 0.7)
    pen_colour = PEN_COLOURS["blue" if rng.random() < 0.5 else "green"]
    stroma_bank, tumour_bank = _texture_bank(rng, tile, mpp)
    n_bank = len(stroma_bank)

    rows, cols = math.ceil(height / tile), math.ceil(width / tile)
    # per-pixel noise comes from random crops of one bank: drawing fresh normals per tile
    # would cost more than everything else in the tile
    noise_bank = rng.normal(0, 1.0, (2 * tile, 2 * tile, 1)).astype(np.float32)

    def render(index: int) -> np.ndarray:
        ty, tx = divmod(index, cols)
        y0, x0 = ty * tile, tx * tile
        fy0, fx0 = y0 // ds, x0 // ds
        fy1, fx1 = (y0 + tile) // ds + 2, (x0 + tile) // ds + 2
        trng = np.random.default_rng((seed, ty, tx))
        oy, ox = trng.integers(0, tile, 2)
        noise = noise_bank[oy : oy + tile, ox : ox + tile]
        window = (slice(max(fy0 - 1, 0), fy1), slice(max(fx0 - 1, 0), fx1))
        if not (tissue_f[window].any() or pen_f[window].any() or speck_f[window].any()):
            img = BACKGROUND + 1.5 * noise
        else:
            t = sharpen(upsample(tissue_f, y0, x0, tile, ds))[..., None]
            k = int(trng.integers(n_bank))
            # flips only: a rotation would turn the stroma fibres and show the tile seams
            flip = (slice(None, None, 1 - 2 * int(trng.integers(2))), slice(None, None, 1 - 2 * int(trng.integers(2))))
            img = stroma_bank[k][flip]
            if tumour_f[window].any():
                u = sharpen(upsample(tumour_f, y0, x0, tile, ds))[..., None]
                tum = tumour_bank[(k + int(trng.integers(1, n_bank))) % n_bank][flip]
                img = img + u * (tum - img)
            if t.min() < 1.0:
                img = BACKGROUND + t * (img - BACKGROUND)
            if pen_f[window].any():
                p = sharpen(upsample(pen_f, y0, x0, tile, ds))[..., None] * 0.85
                img = img + p * (pen_colour - img)
            if speck_f[window].any():
                s = sharpen(upsample(speck_f, y0, x0, tile, ds))[..., None]
                img = img + s * (DEBRIS - img)
            img = img + 3.0 * noise
        return np.clip(img, 0, 255).astype(np.uint8)

    write_pyramid(path, render, rows, cols, tile, width, height, mpp, jpeg_quality, workers)

    return write_ground_truth(path, {"tissue": tissue, "tumour": tumour, "artefacts": pen | specks}, width=width,
                              height=height, mpp=mpp, mask_downsample=ds, seed=seed, pen_marks=bool(pen.any()),
                              debris=bool(specks.any()))


def make_cohort(
    folder: str | os.PathLike,
    n_slides: int = 60,
    seed: int = 0,
    width: int = 8192,
    height: int = 6144,
    mpp: float = 0.5,
    positive_fraction: float = 0.5,
    burden_range: tuple[float, float] = (0.003, 0.4),
) -> Path:
    """Write a labelled cohort of synthetic slides and ``labels.csv``; return the CSV path.

    Tumour burdens of the positive slides are log-uniform over ``burden_range``, from rare
    tiny lesions to large tumours. Slides are paired into patients of the same label, as
    when a patient has two blocks scanned.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels, patient_of = cohort_plan(rng, n_slides, positive_fraction)
    rows = []
    lo, hi = np.log(burden_range[0]), np.log(burden_range[1])
    for i in range(n_slides):
        burden = float(np.exp(rng.uniform(lo, hi))) if labels[i] else 0.0
        slide_id = f"synthetic_{i:03d}"
        info = make_synthetic_slide(
            folder / f"{slide_id}.tif", width=width, height=height, mpp=mpp, seed=seed * 10007 + i,
            tumour_burden=burden, tissue_pieces=int(rng.integers(1, 3)),
            pen_marks=bool(rng.random() < 0.2), debris=bool(rng.random() < 0.2),
        )
        rows.append(cohort_row(slide_id, info, patient_of[i]))
    return write_labels(folder, rows)
