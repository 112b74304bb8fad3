"""Semi-real H&E slides: real tissue texture, subtle lesions, nuisances, and known ground truth.

The cartoon slides of ``napari_mil.synthetic`` are easy on purpose (every model separates them
from the first epoch). These are built to be learned, not recognised at a glance:

- **Texture** is real H&E: 256 px crops (0.5 µm/px, one 20x patch) of the Aperio CMU-1 slide
  the package ships (skin: dense epidermis and collagen-rich dermis), turned and flipped, laid
  as a mosaic over a random tissue shape. A smooth field chooses between the dense (epithelial)
  and the sparse (stromal) crops, so both classes have dense nuclear regions.
- **Lesions** are nuclear atypia on dense crops: nuclei enlarged (grey dilation of the
  haematoxylin concentration), hyperchromatic (more haematoxylin) and crowded (a shifted copy
  of the nuclei laid over the gaps), with a strength set by ``difficulty``. Lesion regions have
  infiltrative edges: islands and strands break off a core. Burdens run from a few patches to
  about a third of the tissue.
- **Nuisances**, in both classes alike: stain variation between slides (haematoxylin and eosin
  amounts and stain vectors, brightness), inflammatory clusters (dense small round dark
  lymphocytes: the commonest mimic of a nuclear-density detector), dense normal epithelium,
  pen marks that may cross the tissue, folds (a band of doubled tissue) and floaters (small
  detached pieces on the glass).

Everything is done in optical density, with Ruifrok and Johnston's stain vectors: the crop's
haematoxylin, eosin and residual concentrations are edited and mixed again with the slide's
own (perturbed) stain vectors. The ground truth is written as ``napari_mil.synthetic`` writes
it (``SyntheticSlide``), with the lesion as the tumour mask, plus a mask of the mimics.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_mil.paths import CMU1_PATH
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
)

SOURCE_SLIDE = CMU1_PATH  # Aperio, freely redistributable
SOURCE_MPP = 0.499
BLOCK = 256  # mosaic block: one 20x patch
RUIFROK = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]], np.float32)
RUIFROK /= np.linalg.norm(RUIFROK, axis=1, keepdims=True)
DEFAULT_DIFFICULTY = 0.5


@dataclass(frozen=True)
class LesionStyle:
    """How a difficulty in [0, 1] turns into pixel changes; 0 is obvious, 1 is barely there."""

    enlarge_px: int  # grey-dilation radius of the nuclei, px at 0.5 µm/px
    hyperchromasia: float  # relative increase of haematoxylin in nuclei
    crowding: float  # weight of the shifted copy of the nuclei
    stain_jitter: float  # spread of the per-slide stain changes
    inflammation_rate: float  # expected inflammatory clusters per slide

    @classmethod
    def from_difficulty(cls, difficulty: float) -> LesionStyle:
        if not 0.0 <= difficulty <= 1.0 or not math.isfinite(difficulty):
            raise ValueError(f"difficulty must be between 0 and 1, not {difficulty}")
        easy = 1.0 - difficulty
        return cls(enlarge_px=int(round(0.5 + 2 * easy)), hyperchromasia=0.6 * easy, crowding=0.8 * easy,
                   stain_jitter=0.10 + 0.15 * difficulty,
                   inflammation_rate=1.0 + 2.0 * difficulty)


# ---- the source texture ---------------------------------------------------------------------
@dataclass
class TextureBank:
    image: np.ndarray  # (H, W, 3) uint8, the source slide at level 0
    dense: np.ndarray  # (K, 2) top-left (y, x) of crops rich in nuclei
    sparse: np.ndarray  # (K', 2) top-left of stromal crops


@functools.lru_cache(maxsize=1)
def texture_bank() -> TextureBank:
    """Crops of the packaged CMU-1 slide that lie wholly in tissue, split by nuclear density."""
    from napari_mil.slide import open_slide

    with open_slide(SOURCE_SLIDE) as slide:
        image = np.ascontiguousarray(slide.read_level(0)[..., :3])
    rgb = image.astype(np.float32)
    mx, mn = rgb.max(2), rgb.min(2)
    tissue = ((mx - mn) / np.maximum(mx, 1) > 0.12) & (mx < 235)
    tissue = ndimage.binary_closing(tissue, iterations=3)
    conc = _concentrations(image)
    step = 32
    ys = np.arange(0, image.shape[0] - BLOCK, step)
    xs = np.arange(0, image.shape[1] - BLOCK, step)
    table = np.pad(tissue.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    hsum = np.pad(conc[..., 0].astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def box(t, y, x):
        return t[y + BLOCK, x + BLOCK] - t[y, x + BLOCK] - t[y + BLOCK, x] + t[y, x]

    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    frac = box(table, yy, xx) / BLOCK**2
    keep = frac >= 0.92
    yy, xx = yy[keep], xx[keep]
    density = box(hsum, yy, xx) / BLOCK**2
    cut = np.quantile(density, 0.6)
    pos = np.stack([yy, xx], 1)
    return TextureBank(image, pos[density >= cut], pos[density < cut])


def _concentrations(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (..., 3) -> haematoxylin, eosin, residual concentrations (..., 3), float32."""
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    return od @ np.linalg.inv(RUIFROK)


def _to_rgb(conc: np.ndarray, stains: np.ndarray) -> np.ndarray:
    od = conc @ stains
    return 256.0 * np.exp(-od) - 1.0


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return yy * yy + xx * xx <= radius * radius + 0.5


def atypia(h: np.ndarray, style: LesionStyle, shift: tuple[int, int]) -> np.ndarray:
    """The haematoxylin concentration (S, S) of a crop with nuclear atypia: enlarged,
    hyperchromatic and crowded nuclei."""
    nuclear = np.clip((h - 0.25) / 0.35, 0.0, 1.0)  # soft nuclear mask
    big = ndimage.grey_dilation(h * nuclear, footprint=_disk(style.enlarge_px), mode="wrap")
    big_nuclear = np.clip((big - 0.25) / 0.35, 0.0, 1.0)
    dark = big * (1.0 + style.hyperchromasia * big_nuclear)
    crowd = np.roll(dark, shift, axis=(0, 1)) * style.crowding
    return np.maximum(np.maximum(h, dark), crowd)


# ---- ground-truth fields ------------------------------------------------------------------
def _lesion_field(rng, tissue: np.ndarray, burden: float) -> np.ndarray:
    """Boolean lesion mask covering about ``burden`` of the tissue: one to three cores with
    infiltrative edges (islands and strands broken off by fine noise)."""
    lesion = np.zeros_like(tissue)
    n_tissue = int(tissue.sum())
    if burden <= 0 or n_tissue == 0:
        return lesion
    target = max(1, int(round(burden * n_tissue)))
    inside = ndimage.distance_transform_edt(tissue)
    coarse = smooth_noise(rng, tissue.shape, sigma=max(tissue.shape) / 14)
    fine = smooth_noise(rng, tissue.shape, sigma=1.2)
    foci = 1 if target < 40 else int(rng.integers(1, 4))
    candidates = np.argwhere(inside > 2)
    if len(candidates) == 0:
        candidates = np.argwhere(tissue)
    yy, xx = np.mgrid[0 : tissue.shape[0], 0 : tissue.shape[1]]
    dist = np.full(tissue.shape, np.inf, np.float32)
    for _ in range(foci):
        cy, cx = candidates[rng.integers(len(candidates))]
        dist = np.minimum(dist, np.hypot(yy - cy, xx - cx).astype(np.float32))
    radius = math.sqrt(target / foci / math.pi)
    # a score that falls with distance from the foci, wobbled coarsely, frayed finely near the edge
    score = -dist / max(radius, 1.0) + 0.35 * coarse + 0.2 * fine
    score[~tissue] = -np.inf
    threshold = np.sort(score[tissue])[::-1][min(target, n_tissue) - 1]
    return (score >= threshold) & tissue


def _blobs(rng, shape, count: int, radius: tuple[float, float], where: np.ndarray | None = None) -> np.ndarray:
    """``count`` round-ish blobs of a radius (mask pixels) in range, centred where ``where`` allows."""
    out = np.zeros(shape, bool)
    pool = np.argwhere(where) if where is not None else None
    if count == 0 or (pool is not None and len(pool) == 0):
        return out
    wobble = smooth_noise(rng, shape, sigma=2.0)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    for _ in range(count):
        cy, cx = pool[rng.integers(len(pool))] if pool is not None else rng.integers(0, shape)
        r = rng.uniform(*radius)
        out |= np.hypot(yy - cy, xx - cx) < r * (1 + 0.25 * wobble)
    return out


def _band(rng, shape, width: float, within: np.ndarray) -> np.ndarray:
    """A fold: a straight band of ``width`` mask pixels across a random line through the tissue."""
    pool = np.argwhere(within)
    if len(pool) == 0:
        return np.zeros(shape, bool)
    cy, cx = pool[rng.integers(len(pool))]
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    d = (xx - cx) * math.sin(angle) - (yy - cy) * math.cos(angle)
    along = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    length = rng.uniform(0.2, 0.5) * max(shape)
    return (np.abs(d) < width / 2) & (np.abs(along) < length / 2) & within


# ---- the writer -----------------------------------------------------------------------------
def make_semireal_slide(
    path: str | os.PathLike,
    width: int = 7168,
    height: int = 5632,
    seed: int = 0,
    lesion_burden: float = 0.1,
    difficulty: float = DEFAULT_DIFFICULTY,
    tissue_pieces: int = 1,
    pen_marks: bool = False,
    fold: bool = False,
    floaters: int = 0,
    stain: dict | None = None,
    jpeg_quality: int = 85,
    workers: int | None = None,
) -> SyntheticSlide:
    """Write a semi-real slide (pyramidal JPEG TIFF at 0.5 µm/px) and its ground truth.

    ``lesion_burden`` is the lesion's share of the tissue (0: a lesion-free slide).
    ``difficulty`` in [0, 1] sets how subtle the atypia is and how much the stain varies.
    ``stain`` overrides the slide's random stain (keys ``h``, ``e``: concentration factors;
    ``angle``: stain-vector perturbation in radians; ``brightness``)."""
    from napari_mil.synthetic.files import write_pyramid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if width < BLOCK * 4 or height < BLOCK * 4:
        raise ValueError(f"slide {width}x{height} is smaller than 4x4 patches of {BLOCK} px")
    if not 0.0 <= lesion_burden < 1.0:
        raise ValueError(f"lesion_burden must be in [0, 1), not {lesion_burden}")
    style = LesionStyle.from_difficulty(difficulty)
    bank = texture_bank()
    rng = np.random.default_rng(seed)
    ds = MASK_DOWNSAMPLE
    mpp = SOURCE_MPP
    shape = (math.ceil(height / ds), math.ceil(width / ds))
    px_per_um = 1.0 / (mpp * ds)  # mask pixels per µm

    tissue = tissue_field(rng, shape, tissue_pieces)
    main = ndimage.binary_erosion(tissue, iterations=2)  # lesions and mimics stay off the edge and the floaters
    if floaters:
        away = ~ndimage.binary_dilation(tissue, iterations=max(3, int(200 * px_per_um)))
        m = max(2, int(0.04 * min(shape)))
        away[:m], away[-m:], away[:, :m], away[:, -m:] = False, False, False, False
        tissue |= _blobs(rng, shape, floaters, (120 * px_per_um, 300 * px_per_um), away)
    lesion = _lesion_field(rng, main, lesion_burden)
    # dense (epithelial) regions: lesions sit in them, and a smooth field adds more until they
    # cover the slide's share of dense tissue, drawn alike for both classes, so that a lesion
    # does not change how much of the slide is dense
    dense_share = rng.uniform(0.3, 0.6)
    lesion_zone = ndimage.binary_dilation(lesion, iterations=2) & tissue
    field = smooth_noise(rng, shape, sigma=max(shape) / 20)
    field[lesion_zone] = np.inf
    n_dense = max(int(dense_share * tissue.sum()), int(lesion_zone.sum()))
    dense = np.zeros(shape, bool)
    if n_dense:
        dense = field >= np.sort(field[tissue])[::-1][min(n_dense, int(tissue.sum())) - 1]
    n_inflam = int(rng.poisson(style.inflammation_rate))
    inflam = _blobs(rng, shape, n_inflam, (60 * px_per_um, 180 * px_per_um), main & ~lesion) & tissue
    folds = _band(rng, shape, rng.uniform(60, 160) * px_per_um, tissue) if fold else np.zeros(shape, bool)
    pen = np.zeros(shape, bool)
    if pen_marks:


        pen = stroke(shape, rng, width_px=max(2.0, 250 * px_per_um))

    # the slide's stain: haematoxylin and eosin amounts, perturbed stain vectors, brightness
    j = style.stain_jitter
    stain = dict(stain or {})
    h_amount = stain.get("h", float(np.exp(rng.normal(0, j))))
    e_amount = stain.get("e", float(np.exp(rng.normal(0, 1.3 * j))))
    angle = stain.get("angle", float(rng.normal(0, 0.6 * j)))
    brightness = stain.get("brightness", float(np.exp(rng.normal(0, 0.3 * j))))
    stains = RUIFROK.copy()
    for row, sign in ((0, 1), (1, -1)):  # turn H and E towards each other (or apart) in OD space
        other = RUIFROK[1 - row]
        v = stains[row] + sign * angle * (other - stains[row])
        stains[row] = v / np.linalg.norm(v)
    scale = np.array([h_amount, e_amount, 1.0], np.float32) * brightness

    fields = {name: ndimage.gaussian_filter(f.astype(np.float32), 0.7)
              for name, f in (("tissue", tissue), ("lesion", lesion), ("inflam", inflam), ("fold", folds), ("pen", pen))}
    dense_f = dense.astype(np.float32)
    pen_colour = PEN_COLOURS["blue" if rng.random() < 0.5 else "green"]
    lymph_bank = [nuclei_layer(rng, BLOCK, int((BLOCK * mpp) ** 2 / 45), (2.6 / mpp, 3.6 / mpp), (1.0, 1.25))
                  for _ in range(4)]
    noise_bank = rng.normal(0, 1.0, (2 * BLOCK, 2 * BLOCK, 1)).astype(np.float32)
    rows, cols = math.ceil(height / BLOCK), math.ceil(width / BLOCK)
    cells = BLOCK // ds

    def render(index: int) -> np.ndarray:
        by, bx = divmod(index, cols)
        y0, x0 = by * BLOCK, bx * BLOCK
        brng = np.random.default_rng((seed, by, bx))
        oy, ox = brng.integers(0, BLOCK, 2)
        noise = noise_bank[oy : oy + BLOCK, ox : ox + BLOCK]
        window = (slice(max(by * cells - 1, 0), (by + 1) * cells + 1), slice(max(bx * cells - 1, 0), (bx + 1) * cells + 1))
        if not (fields["tissue"][window].any() or fields["pen"][window].any()):
            return np.clip(BACKGROUND + 1.5 * noise, 0, 255).astype(np.uint8)
        pool = bank.dense if dense_f[window].mean() >= 0.5 else bank.sparse
        sy, sx = pool[brng.integers(len(pool))]
        crop = bank.image[sy : sy + BLOCK, sx : sx + BLOCK]
        crop = np.rot90(crop, int(brng.integers(4)))
        if brng.integers(2):
            crop = crop[:, ::-1]
        conc = _concentrations(crop)
        if fields["lesion"][window].any():
            u = sharpen(upsample(fields["lesion"], y0, x0, BLOCK, ds))
            shift = tuple(int(v) * int(s) for v, s in zip(brng.integers(6, 14, 2), brng.choice([-1, 1], 2)))
            conc[..., 0] += u * (atypia(conc[..., 0], style, shift) - conc[..., 0])
        if fields["inflam"][window].any():
            v = sharpen(upsample(fields["inflam"], y0, x0, BLOCK, ds))
            lymph = lymph_bank[int(brng.integers(len(lymph_bank)))]
            conc[..., 0] = np.maximum(conc[..., 0], v * lymph * brng.uniform(0.9, 1.2))
            conc[..., 1] *= 1.0 - 0.5 * v * lymph
        if fields["fold"][window].any():
            f = sharpen(upsample(fields["fold"], y0, x0, BLOCK, ds))[..., None]
            conc *= 1.0 + 0.9 * f
        img = _to_rgb(conc * scale, stains)
        t = sharpen(upsample(fields["tissue"], y0, x0, BLOCK, ds))[..., None]
        if t.min() < 1.0:
            img = BACKGROUND + t * (img - BACKGROUND)
        if fields["pen"][window].any():
            p = sharpen(upsample(fields["pen"], y0, x0, BLOCK, ds))[..., None] * 0.7
            img = img + p * (pen_colour - img)
        return np.clip(img + 2.0 * noise, 0, 255).astype(np.uint8)

    write_pyramid(path, render, rows, cols, BLOCK, width, height, mpp, jpeg_quality, workers)

    return write_ground_truth(
        path, {"tissue": tissue, "tumour": lesion, "artefacts": pen | folds, "mimics": inflam}, width=width,
        height=height, mpp=mpp, mask_downsample=ds, seed=seed, pen_marks=bool(pen.any()), debris=bool(floaters),
        kind="semireal", difficulty=difficulty, fold=bool(folds.any()),
        stain={"h": h_amount, "e": e_amount, "angle": angle, "brightness": brightness})


def make_semireal_cohort(
    folder: str | os.PathLike,
    n_slides: int = 60,
    seed: int = 0,
    width: int = 7168,
    height: int = 5632,
    difficulty: float = DEFAULT_DIFFICULTY,
    positive_fraction: float = 0.5,
    burden_range: tuple[float, float] = (0.01, 0.3),
    workers: int | None = None,
    progress=None,
) -> Path:
    """Write a labelled cohort of semi-real slides and ``labels.csv``; return the CSV's path.

    Lesion burdens of the positive slides are log-uniform over ``burden_range`` (1% of ~300
    patches is a few patches). Nuisances are drawn for every slide whatever its label: pen
    marks (25%), folds (25%), floaters (30%), inflammatory clusters and the stain. Slides pair
    into patients of one label. Slides already written (same name, with their JSON) are kept,
    so an interrupted cohort resumes. ``progress(done, total)`` after each slide."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels, patient_of = cohort_plan(rng, n_slides, positive_fraction)
    lo, hi = np.log(burden_range[0]), np.log(burden_range[1])
    rows = []
    for i in range(n_slides):
        burden = float(np.exp(rng.uniform(lo, hi))) if labels[i] else 0.0
        options = dict(tissue_pieces=int(rng.integers(1, 3)), pen_marks=bool(rng.random() < 0.25),
                       fold=bool(rng.random() < 0.25), floaters=int(rng.random() < 0.3) * int(rng.integers(1, 4)))
        slide_id = f"semireal_{i:03d}"
        target = folder / f"{slide_id}.tif"
        if target.exists() and target.with_suffix(".json").exists():
            info = SyntheticSlide.load(target)
        else:
            info = make_semireal_slide(target, width=width, height=height, seed=seed * 10007 + i, lesion_burden=burden,
                                       difficulty=difficulty, workers=workers, **options)
        rows.append(cohort_row(slide_id, info, patient_of[i]))
        if progress is not None:
            progress(i + 1, n_slides)
    return write_labels(folder, rows)
