"""Synthetic H&E whole-slide images with known ground truth, for demos, tests and benchmarks.

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

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_mil.atomic import atomic_path, write_csv, write_text

MASK_DOWNSAMPLE = 32  # ground-truth masks: one pixel per 32x32 level-0 pixels

BACKGROUND = np.array([243, 241, 242], np.float32)
STROMA = np.array([233, 168, 200], np.float32)
TUMOUR_CYTOPLASM = np.array([205, 140, 190], np.float32)
HEMATOXYLIN = np.array([75, 45, 125], np.float32)
PEN_COLOURS = {"blue": np.array([40, 70, 175], np.float32), "green": np.array([40, 140, 70], np.float32)}
DEBRIS = np.array([35, 30, 30], np.float32)


@dataclass
class SyntheticSlide:
    """Where a synthetic slide and its ground truth were written, and what it contains."""

    path: str
    tissue_mask_path: str
    tumour_mask_path: str
    artefact_mask_path: str  # pen strokes and debris on the glass
    width: int
    height: int
    mpp: float
    mask_downsample: int
    seed: int
    tumour_fraction: float  # of the tissue area
    label: int  # 1 when any tumour is present
    pen_marks: bool
    debris: bool  # debris specks (cartoon) or floaters (semi-real) on the glass
    kind: str = "cartoon"  # or "semireal" (napari_mil.semireal)
    difficulty: float | None = None  # semi-real: how subtle the lesion is, 0-1
    mimic_mask_path: str = ""  # semi-real: inflammatory clusters, the lesion's mimics
    fold: bool = False
    stain: dict | None = None  # semi-real: the slide's stain changes

    @classmethod
    def load(cls, slide_path: str | os.PathLike) -> SyntheticSlide:
        meta = json.loads(Path(slide_path).with_suffix(".json").read_text())
        return cls(**{k: v for k, v in meta.items() if k in cls.__dataclass_fields__})

    def tissue_mask(self) -> np.ndarray:
        return _read_png(self.tissue_mask_path) > 127

    def tumour_mask(self) -> np.ndarray:
        return _read_png(self.tumour_mask_path) > 127

    def artefact_mask(self) -> np.ndarray:
        return _read_png(self.artefact_mask_path) > 127

    def mimic_mask(self) -> np.ndarray:
        if not self.mimic_mask_path:
            return np.zeros_like(self.tissue_mask())
        return _read_png(self.mimic_mask_path) > 127


def _read_png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def _write_png(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray((mask > 0).astype(np.uint8) * 255).save(tmp, format="PNG")


# ---- ground-truth fields ------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-6)


def _tissue_field(rng, shape, pieces: int) -> np.ndarray:
    """Boolean tissue mask at mask resolution: a few irregular blobs, well inside the slide."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    wobble = _smooth_noise(rng, shape, sigma=max(h, w) / 18)
    mask = np.zeros(shape, bool)
    for i in range(pieces):
        cy = h * rng.uniform(0.3, 0.7) if pieces == 1 else h * rng.uniform(0.25, 0.75)
        cx = w * (i + 0.5) / pieces + rng.uniform(-0.05, 0.05) * w
        ry = h * rng.uniform(0.25, 0.34) if pieces == 1 else h * rng.uniform(0.15, 0.3)
        rx = w * rng.uniform(0.25, 0.34) / pieces * (1 if pieces == 1 else 1.2)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        mask |= (u * u + v * v) < (1.0 + 0.18 * wobble)
    # keep a margin of background around the tissue
    m = max(2, int(0.04 * min(h, w)))
    mask[:m], mask[-m:], mask[:, :m], mask[:, -m:] = False, False, False, False
    return mask


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
    noise = _smooth_noise(rng, tissue.shape, sigma=max(tissue.shape) / 24)
    score = noise + 0.15 * inside / (inside.max() + 1e-6)
    threshold = np.quantile(score[tissue], 1.0 - min(burden, 0.95))
    return (score >= threshold) & tissue


def _stroke(shape, rng, width_px: float) -> np.ndarray:
    """A pen stroke: a thick, slightly curved line near one edge of the slide."""
    h, w = shape
    t = np.linspace(0, 1, 200)
    y = h * (0.12 + 0.06 * np.sin(2 * np.pi * t + rng.uniform(0, 6))) if rng.random() < 0.5 else h * (
        0.88 + 0.05 * np.sin(2 * np.pi * t + rng.uniform(0, 6))
    )
    x = w * (0.15 + 0.3 * t)
    mask = np.zeros(shape, bool)
    mask[np.clip(y.astype(int), 0, h - 1), np.clip(x.astype(int), 0, w - 1)] = True
    return ndimage.binary_dilation(mask, iterations=max(1, int(width_px / 2)))


# ---- textures ---------------------------------------------------------------------------
def _nuclei_layer(rng, size: int, count: int, radius_px: tuple[float, float], elongation: tuple[float, float]):
    """Alpha layer (size, size) of soft-edged elliptical nuclei, toroidally wrapped."""
    alpha = np.zeros((size, size), np.float32)
    for _ in range(count):
        r = rng.uniform(*radius_px)
        e = rng.uniform(*elongation)
        a, b = r * e, r / math.sqrt(e)
        theta = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(0, size, 2)
        half = int(math.ceil(max(a, b))) + 2
        ys = np.arange(int(cy) - half, int(cy) + half + 1)
        xs = np.arange(int(cx) - half, int(cx) + half + 1)
        dy, dx = np.meshgrid(ys - cy, xs - cx, indexing="ij")
        u = (dx * math.cos(theta) + dy * math.sin(theta)) / a
        v = (-dx * math.sin(theta) + dy * math.cos(theta)) / b
        d = np.sqrt(u * u + v * v)
        blob = np.clip((1.15 - d) * 4.0, 0.0, 1.0) * rng.uniform(0.75, 1.0)
        # chromatin texture: darker rim and speckles
        blob *= 0.85 + 0.15 * np.clip(d, 0, 1)
        iy, ix = np.ix_(ys % size, xs % size)
        alpha[iy, ix] = np.maximum(alpha[iy, ix], blob)
    return alpha


def _texture_bank(rng, size: int, mpp: float, n: int = 6):
    """(stroma, tumour) lists of float32 RGB tiles of ``size`` px at ``mpp``."""
    um = 1.0 / mpp  # pixels per µm
    area_um2 = (size / um) ** 2
    stroma_tiles, tumour_tiles = [], []
    for _ in range(n):
        fibres = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), (0.8 * um, 6 * um), mode="wrap")
        fibres = fibres / (fibres.std() + 1e-6)
        base = STROMA[None, None, :] * (1.0 + 0.05 * fibres[..., None])
        nuc = _nuclei_layer(rng, size, int(area_um2 / 900), (2.0 * um, 3.0 * um), (2.0, 3.5))
        stroma = base * (1 - nuc[..., None]) + HEMATOXYLIN * 1.15 * nuc[..., None]
        stroma_tiles.append(stroma.astype(np.float32))

        grain = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 1.5 * um, mode="wrap")
        grain = grain / (grain.std() + 1e-6)
        base = TUMOUR_CYTOPLASM[None, None, :] * (1.0 + 0.04 * grain[..., None])
        nuc = _nuclei_layer(rng, size, int(area_um2 / 110), (4.0 * um, 7.0 * um), (1.0, 1.6))
        dark = HEMATOXYLIN * rng.uniform(0.7, 0.85)
        tumour = base * (1 - nuc[..., None]) + dark * nuc[..., None]
        tumour_tiles.append(tumour.astype(np.float32))
    return stroma_tiles, tumour_tiles


def _upsample(field: np.ndarray, y0: int, x0: int, tile: int, ds: int) -> np.ndarray:
    """Bilinear sample of a mask-resolution float field at level-0 pixel centres of a tile
    (separable: interpolate the few field rows along x, then those rows along y)."""
    h, w = field.shape
    ys = np.clip((np.arange(y0, y0 + tile) + 0.5) / ds - 0.5, 0, h - 1)
    xs = np.clip((np.arange(x0, x0 + tile) + 0.5) / ds - 0.5, 0, w - 1)
    iy = ys.astype(int)
    ix = xs.astype(int)
    iy1 = np.minimum(iy + 1, h - 1)
    ix1 = np.minimum(ix + 1, w - 1)
    fy = (ys - iy).astype(np.float32)[:, None]
    fx = (xs - ix).astype(np.float32)
    r0, r1 = iy[0], iy1[-1] + 1
    rows = field[r0:r1]
    along_x = rows[:, ix] * (1 - fx) + rows[:, ix1] * fx  # (few rows, tile)
    return along_x[iy - r0] * (1 - fy) + along_x[iy1 - r0] * fy


def _sharpen(alpha: np.ndarray) -> np.ndarray:
    return np.clip((alpha - 0.5) * 3.0 + 0.5, 0.0, 1.0)


def write_pyramid(path: Path, render, rows: int, cols: int, tile: int, width: int, height: int, mpp: float,
                  jpeg_quality: int = 80, workers: int | None = None) -> None:
    """Write a pyramidal JPEG TIFF atomically from ``render(index) -> (tile, tile, 3) uint8``,
    called for each tile in row-major order (rows are rendered in parallel threads, a row at a
    time, which bounds the memory in flight). Levels downsample by 4 down to ~512 px."""
    import tifffile
    from PIL import Image

    level_ds = [1]
    while max(width, height) / (level_ds[-1] * 4) >= 512 and len(level_ds) < 6:
        level_ds.append(level_ds[-1] * 4)
    level1_ds = level_ds[1] if len(level_ds) > 1 else None
    level1 = np.empty((rows * tile // level1_ds, cols * tile // level1_ds, 3), np.uint8) if level1_ds else None

    def render_and_reduce(index: int) -> np.ndarray:
        out = render(index)
        if level1 is not None:
            ty, tx = divmod(index, cols)
            f = level1_ds
            level1[ty * tile // f : (ty + 1) * tile // f, tx * tile // f : (tx + 1) * tile // f] = \
                np.asarray(Image.fromarray(out).reduce(f))
        return out

    workers = workers or min(4, os.cpu_count() or 1)

    def tiles():
        with ThreadPoolExecutor(workers) as pool:
            for r in range(rows):
                yield from pool.map(render_and_reduce, range(r * cols, (r + 1) * cols))

    res = 1e4 / mpp  # pixels per centimetre
    # RGB photometric interpretation, as Aperio writes: OpenSlide shows YCbCr JPEG tiles in wrong colours
    options = dict(
        photometric="rgb", compression="jpeg", compressionargs={"level": jpeg_quality}, resolutionunit="CENTIMETER"
    )
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 2**31) as tw:
            tw.write(
                tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile),
                resolution=(res, res), subfiletype=0, maxworkers=workers, **options,
            )
            if level1 is not None:
                prev = level1[: height // level1_ds, : width // level1_ds]
                for i, f in enumerate(level_ds[1:]):
                    if i > 0:
                        h2, w2 = prev.shape[0] // 4 * 4, prev.shape[1] // 4 * 4
                        prev = prev[:h2, :w2].reshape(h2 // 4, 4, w2 // 4, 4, 3).mean(axis=(1, 3)).astype(np.uint8)
                    tw.write(
                        np.ascontiguousarray(prev), tile=(256, 256), resolution=(res / f, res / f),
                        subfiletype=1, maxworkers=workers, **options,
                    )


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2))


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
    tissue = _tissue_field(rng, field_shape, tissue_pieces)
    tumour = _tumour_field(rng, tissue, tumour_burden, mpp)
    glass_px = 1.0 / (mpp * ds)  # mask pixels per µm
    pen = np.zeros(field_shape, bool)
    if pen_marks:
        pen = _stroke(field_shape, rng, width_px=max(2.0, 250 * glass_px)) & ~ndimage.binary_dilation(tissue, iterations=2)
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
            t = _sharpen(_upsample(tissue_f, y0, x0, tile, ds))[..., None]
            k = int(trng.integers(n_bank))
            # flips only: a rotation would turn the stroma fibres and show the tile seams
            flip = (slice(None, None, 1 - 2 * int(trng.integers(2))), slice(None, None, 1 - 2 * int(trng.integers(2))))
            img = stroma_bank[k][flip]
            if tumour_f[window].any():
                u = _sharpen(_upsample(tumour_f, y0, x0, tile, ds))[..., None]
                tum = tumour_bank[(k + int(trng.integers(1, n_bank))) % n_bank][flip]
                img = img + u * (tum - img)
            if t.min() < 1.0:
                img = BACKGROUND + t * (img - BACKGROUND)
            if pen_f[window].any():
                p = _sharpen(_upsample(pen_f, y0, x0, tile, ds))[..., None] * 0.85
                img = img + p * (pen_colour - img)
            if speck_f[window].any():
                s = _sharpen(_upsample(speck_f, y0, x0, tile, ds))[..., None]
                img = img + s * (DEBRIS - img)
            img = img + 3.0 * noise
        return np.clip(img, 0, 255).astype(np.uint8)

    write_pyramid(path, render, rows, cols, tile, width, height, mpp, jpeg_quality, workers)

    stem = path.with_suffix("")
    tissue_png = Path(f"{stem}.tissue.png")
    tumour_png = Path(f"{stem}.tumour.png")
    _write_png(tissue_png, tissue)
    _write_png(tumour_png, tumour)
    artefact_png = Path(f"{stem}.artefacts.png")
    _write_png(artefact_png, pen | specks)
    info = SyntheticSlide(
        path=str(path), tissue_mask_path=str(tissue_png), tumour_mask_path=str(tumour_png),
        artefact_mask_path=str(artefact_png),
        width=width, height=height, mpp=mpp, mask_downsample=ds, seed=seed,
        tumour_fraction=float(tumour.sum() / max(tissue.sum(), 1)), label=int(tumour.any()),
        pen_marks=bool(pen.any()), debris=bool(specks.any()),
    )
    _write_json(path.with_suffix(".json"), asdict(info))
    return info


def cohort_plan(rng: np.random.Generator, n_slides: int, positive_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled slide labels and patient numbers: slides of one label paired into patients, as
    when a patient has two blocks scanned."""
    n_pos = int(round(n_slides * positive_fraction))
    labels = np.array([1] * n_pos + [0] * (n_slides - n_pos))
    rng.shuffle(labels)
    patient_of = np.empty(n_slides, int)
    next_id = 0
    for label in (1, 0):
        members = np.flatnonzero(labels == label)
        patient_of[members] = next_id + np.arange(len(members)) // 2
        next_id += (len(members) + 1) // 2
    return labels, patient_of


def write_labels(folder: Path, rows: list[dict]) -> Path:
    """``folder/labels.csv`` from the cohort's rows, atomically; returns its path."""
    return write_csv(folder / "labels.csv", rows)


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
        rows.append({
            "slide_id": slide_id, "path": f"{slide_id}.tif", "label": info.label,
            "patient_id": f"patient_{patient_of[i]:03d}", "tumour_fraction": f"{info.tumour_fraction:.5f}",
        })
    return write_labels(folder, rows)
