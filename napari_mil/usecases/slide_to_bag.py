"""From a slide file to its bag of patch features: tissue, patch grid, features.

One set of tissue and grid settings (``GridSettings``) for the command line, the docks and the
training cohort. Files written for a slide named NAME under an output folder OUT:

    OUT/masks/NAME.png      the tissue mask
    OUT/patches/NAME.h5     the patch grid (reused by later runs with the same settings)
    OUT/previews/NAME.png   the grid over a thumbnail
    OUT/features_<encoder>/NAME.h5   the features (``slide_to_bag``)

The core never imports Qt: callers get progress through callbacks and stop work with ``cancel``.
"""

from __future__ import annotations

import csv
import json
import math
import operator
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from napari_mil.atomic import atomic_path, write_json
from napari_mil.errors import ExtractionCancelled, GridError, NapariMilError
from napari_mil.names import check_name
from napari_mil.slide.base import Slide, is_slide_path, validate_mpp
from napari_mil.tiling import MIN_PATCH_SIZE, PatchGrid, make_patch_grid
from napari_mil.tissue import PRESETS, TissueMask, TissueParams, detect_tissue


@dataclass(frozen=True)
class GridSettings:
    """How a slide's tissue is found and tiled; checked when made.

    ``target_mpp``, when given, replaces ``magnification``. ``saturation_threshold`` and
    ``min_tissue_area_um2`` override the preset's (None: the preset's; the threshold's None is Otsu).
    ``mpp`` is the level-0 µm per pixel for slides that record none.
    """

    magnification: float = 20.0
    target_mpp: float | None = None
    patch_size: int = 256
    overlap: int = 0
    min_tissue: float = 0.5
    preset: str = "resection"
    saturation_threshold: int | None = None
    min_tissue_area_um2: float | None = None
    mpp: float | None = None

    def __post_init__(self):
        if self.target_mpp is not None:
            if not _number(self.target_mpp, "target mpp") > 0:
                raise GridError(f"target mpp must be positive, got {self.target_mpp}")
        elif not _number(self.magnification, "target magnification") > 0:
            raise GridError(f"target magnification must be positive, got {self.magnification}")
        patch_size, overlap = _whole(self.patch_size, "patch size"), _whole(self.overlap, "overlap")
        if patch_size < MIN_PATCH_SIZE:
            raise GridError(f"patch size {patch_size} px is too small (at least {MIN_PATCH_SIZE})")
        if not 0 <= overlap < patch_size:
            raise GridError(f"overlap must be in [0, patch size), got {overlap} for {patch_size} px patches")
        if not 0.0 <= _number(self.min_tissue, "minimum tissue fraction") <= 1.0:
            raise GridError(f"minimum tissue fraction must be within 0-1, got {self.min_tissue}")
        if self.preset not in PRESETS:
            raise NapariMilError(f"unknown tissue preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        threshold = self.saturation_threshold
        if threshold is not None and not 0 <= _whole(threshold, "saturation threshold") <= 255:
            raise NapariMilError(f"saturation threshold must be within 0-255, got {threshold}")
        area = self.min_tissue_area_um2
        if area is not None and not _number(area, "minimum tissue area") >= 0:
            raise NapariMilError(f"minimum tissue area must be 0 or more, got {area}")
        if self.mpp is not None:
            validate_mpp(self.mpp)

    def record(self) -> str:
        """What a grid file keeps of the settings that made it (``grid_settings``), for later runs
        to tell whether it is theirs. The fallback ``mpp`` is left out: the grid's geometry has
        the µm per pixel that was used."""
        return json.dumps({k: v for k, v in asdict(self).items() if k != "mpp"}, sort_keys=True)

    def tissue_params(self) -> TissueParams:
        """The preset's detector parameters with this setting's overrides."""
        overrides = {k: v for k, v in (("saturation_threshold", self.saturation_threshold),
                                       ("min_tissue_area_um2", self.min_tissue_area_um2)) if v is not None}
        return replace(PRESETS[self.preset], **overrides)

    def grid_options(self) -> dict:
        """``make_patch_grid``'s keyword arguments."""
        return dict(patch_size=self.patch_size, target_mpp=self.target_mpp,
                    magnification=None if self.target_mpp is not None else self.magnification,
                    overlap=self.overlap, min_tissue=self.min_tissue)


def _number(value, what: str) -> float:
    """``value`` as a finite float (NaN and infinities fail every range check as NaN)."""
    if isinstance(value, bool):
        raise GridError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GridError(f"{what} must be a number, got {value!r}") from None
    return number if math.isfinite(number) else math.nan


def _whole(value, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise GridError(f"{what} must be a whole number, got {value!r}") from None


@dataclass(frozen=True)
class TileResult:
    slide: str  # the slide's name: the stem of the files written
    patches: int
    tissue_fraction: float  # of the whole slide
    mask: Path
    grid: Path
    preview: Path


@dataclass(frozen=True)
class SlideGrid:
    grid: PatchGrid
    mpp: float  # the slide's level-0 µm per pixel, recorded or given
    tiled: bool  # False: reused from OUT/patches/


def expand_inputs(inputs: list[str]) -> list[tuple[Path, float | None]]:
    """Slides from files, folders (not recursive) and CSVs (column ``path``, optional ``mpp``).

    Relative paths in a CSV are relative to the CSV's folder.
    """
    out: list[tuple[Path, float | None]] = []
    for item in inputs:
        p = Path(item)
        if p.suffix.lower() == ".csv":
            if not p.exists():
                raise NapariMilError(f"{p} does not exist")
            with open(p, newline="") as fh:
                reader = csv.DictReader(fh)
                column = next((c for c in ("path", "slide_path", "slide") if c in (reader.fieldnames or [])), None)
                if column is None:
                    raise NapariMilError(f"{p}: no 'path' column (columns: {', '.join(reader.fieldnames or [])})")
                for line, row in enumerate(reader, start=2):
                    sp = Path(row[column])
                    if not sp.is_absolute():
                        sp = p.parent / sp
                    mpp = (row.get("mpp") or "").strip()
                    out.append((sp, validate_mpp(mpp, f"{p.name} line {line}: mpp") if mpp else None))
        elif p.is_dir() and not any(p.glob("*.dcm")):
            out.extend((f, None) for f in sorted(p.iterdir()) if f.is_file() and is_slide_path(f))
        else:
            out.append((p, None))
    return out


def detect(slide: Slide, settings: GridSettings = GridSettings()) -> TissueMask:
    """The slide's tissue mask (empty when there is none, so that it can be painted in)."""
    return detect_tissue(slide, settings.tissue_params())


def make_grid(slide: Slide, mask: TissueMask, settings: GridSettings = GridSettings()) -> PatchGrid:
    """The patches over the (possibly edited) mask."""
    return make_patch_grid(slide, mask, **settings.grid_options())


def _open(path: str | Path, settings: GridSettings, mpp: float | None):
    from napari_mil.slide import open_slide

    return open_slide(path, mpp=mpp if mpp is not None else settings.mpp)


def tile_slide(path: str | Path, out: str | Path, settings: GridSettings = GridSettings(),
               mpp: float | None = None) -> TileResult:
    """Detect tissue, tile it and write the mask, grid and preview under ``out`` (atomically).
    ``mpp`` (this slide's, e.g. from a CSV) comes before the settings' one."""
    from PIL import Image

    from napari_mil.tiling import render_grid_preview

    out = Path(out)
    with _open(path, settings, mpp) as slide:
        slide.require_mpp()
        check_name(slide.name, "slide name")
        mask = detect(slide, settings)
        mask_path = mask.save(out / "masks" / f"{slide.name}.png")
        grid = make_grid(slide, mask, settings)
        grid.extra["grid_settings"] = settings.record()
        grid_path = grid.save(out / "patches" / f"{slide.name}.h5")
        preview_path = out / "previews" / f"{slide.name}.png"
        with atomic_path(preview_path) as tmp:
            Image.fromarray(render_grid_preview(slide, mask, grid)).save(tmp, format="PNG")
        return TileResult(slide.name, len(grid), mask.tissue_area_fraction, mask_path, grid_path, preview_path)


def slide_grid(path: str | Path, out: str | Path, settings: GridSettings | None = None,
               mpp: float | None = None) -> SlideGrid:
    """The slide's grid from ``out``/patches/<slide>.h5, or tiled now (over it) when there is
    none or it does not fit ``settings`` (``_fits``). Without ``settings`` the file is used as
    it is, whatever made it (the viewer's edited grid), and a missing one is tiled with the
    defaults. An unreadable grid file is a GridError saying so."""
    out, given = Path(out), settings
    settings = settings or GridSettings()
    with _open(path, settings, mpp) as slide:
        grid_file = out / "patches" / f"{check_name(slide.name, 'slide name')}.h5"
        if grid_file.exists():
            grid = _load_grid(grid_file, slide)
            if given is None or _fits(grid, slide, given):
                return SlideGrid(grid, slide.mpp, tiled=False)
    tile_slide(path, out, settings, mpp)
    with _open(path, settings, mpp) as slide:
        return SlideGrid(_load_grid(grid_file, slide), slide.mpp, tiled=True)


def _load_grid(grid_file: Path, slide: Slide) -> PatchGrid:
    try:
        return PatchGrid.load(grid_file, slide=slide)
    except GridError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise GridError(f"{grid_file} cannot be read as a patch grid ({exc}): delete it to tile the slide "
                        "again") from None


def _fits(grid: PatchGrid, slide: Slide, settings: GridSettings) -> bool:
    """Whether a grid file has the geometry ``settings`` give on this slide and, when it records
    them (``tile`` does), the same tissue settings. A grid made elsewhere with the same geometry
    (edited in the viewer, TRIDENT's) fits."""
    recorded = grid.extra.get("grid_settings")
    return geometry_fits(grid.geometry, slide, settings) and (recorded is None or recorded == settings.record())


def geometry_fits(geometry, slide: Slide, settings: GridSettings) -> bool:
    """Whether a patch geometry (a grid's or a feature file's) is the one ``settings`` give on
    this slide: patch size, level-0 extent, overlap and µm per pixel."""
    from napari_mil.tiling import target_downsample

    options = settings.grid_options()
    size0 = int(round(settings.patch_size * target_downsample(slide, options["target_mpp"], options["magnification"])))
    if (geometry.patch_size, geometry.patch_size_level0, geometry.overlap) != (settings.patch_size, size0,
                                                                                settings.overlap):
        return False
    return geometry.level0_mpp is not None and math.isclose(geometry.level0_mpp, slide.require_mpp(), rel_tol=1e-6)


def slide_to_bag(path: str | Path, encoder, out: str | Path, settings: GridSettings | None = None,
                 mpp: float | None = None, batch_size: int = 64, num_workers: int | None = None,
                 dtype: str = "float16", progress: Callable | None = None,
                 cancel: Callable[[], bool] | None = None):
    """The slide's features under ``out``/features_<encoder>/: its grid (reused or tiled, see
    ``slide_grid``), then ``extract_features`` (cached, resumable; ``progress`` gets its
    ExtractionProgress reports, ``cancel`` is polled between batches). Returns the ExtractionResult."""
    from napari_mil.features.extract import extract_features

    if cancel is not None and cancel():
        raise ExtractionCancelled(f"stopped before {Path(path).name}")
    found = slide_grid(path, out, settings, mpp)
    return extract_features(path, found.grid, encoder, out, batch_size=batch_size, num_workers=num_workers,
                            dtype=dtype, mpp=found.mpp, progress=progress, cancel=cancel)


def write_extract_manifest(out: str | Path, encoder, parameters: dict, slides: list[dict]) -> Path:
    """``out``/extract_manifest_<time>.json: versions, the encoder, the parameters and each slide's outcome."""
    import platform
    import time

    import torch

    import napari_mil

    manifest = {
        "command": "extract", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"napari_mil": napari_mil.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "encoder": {"name": encoder.name, "weights_hash": encoder.weights_hash, "dim": encoder.dim,
                    "precision": str(encoder.precision), "device": str(encoder.device)},
        "parameters": parameters,
        "slides": slides,
    }
    path = Path(out) / f"extract_manifest_{time.strftime('%Y%m%d-%H%M%S')}.json"
    if path.exists():  # another run into the same folder in the same second: keep both
        path = path.with_name(f"{path.stem}-{os.getpid()}.json")
    return write_json(path, manifest)
