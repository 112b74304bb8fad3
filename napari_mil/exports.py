"""Exports of attention maps: QuPath GeoJSON, per-patch CSV, PNG overlays and top-k patches.

Several maps over the same patches (a teacher and its student) go into one file, each map's
columns prefixed with its name. Every file is written to a temporary name and renamed into
place, so an interrupted export never leaves a half-written file under the final name.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from napari_mil.atomic import atomic_path
from napari_mil.errors import NapariMilError
from napari_mil.heatmaps import (
    MASK_KINDS,
    MASK_LABELS,
    MAX_PIXELS,
    NORMALISATIONS,
    AttentionMap,
    check_pixels,
    load_attention,
)
from napari_mil.names import check_name
from napari_mil.paths import DATA_DIR

EXPORT_FORMATS = ("geojson", "csv", "png", "topk")


def _check_same_patches(maps: dict[str, AttentionMap]) -> AttentionMap:
    if not maps:
        raise NapariMilError("nothing to export: no attention map")
    first = next(iter(maps.values()))
    for name, m in maps.items():
        if len(m) != len(first) or not np.array_equal(m.coords, first.coords):
            raise NapariMilError(f"map {name!r} covers other patches than {next(iter(maps))!r}")
    return first


def _atomic(path: Path, write) -> Path:
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def patch_table(maps: dict[str, AttentionMap]) -> tuple[list[str], list[np.ndarray]]:
    """Column names and (N,) columns: geometry, then per map attention, percentile, rank and masks."""
    first = _check_same_patches(maps)
    size = first.patch_size_level0
    names = ["x", "y", "width", "height"]
    columns = [first.coords[:, 0], first.coords[:, 1], np.full(len(first), size), np.full(len(first), size)]
    for name, m in maps.items():
        names += [f"{name} attention", f"{name} percentile", f"{name} rank"]
        columns += [m.values, m.normalised("rank"), m.ranks()]
        for kind in MASK_KINDS:
            if kind in m.masked:
                names.append(f"{name} {MASK_LABELS[kind]}")
                columns.append(m.masked[kind].astype(np.int8))
    return names, columns


def export_csv(path: str | Path, maps: dict[str, AttentionMap]) -> Path:
    """One row per patch: level-0 x, y, width, height, then each map's attention, percentile
    rank (0-1), rank (1 = highest) and masked flags (0/1)."""
    names, columns = patch_table(maps)

    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(names)
            out.writerows(zip(*[c.tolist() for c in columns]))

    return _atomic(Path(path), write)


def export_geojson(path: str | Path, maps: dict[str, AttentionMap]) -> Path:
    """A GeoJSON FeatureCollection that QuPath imports (File > Import objects, or drag and drop):
    one detection per patch, a square in level-0 pixels, with the table's values as measurements
    (colour them with Measure > Show measurement maps)."""
    names, columns = patch_table(maps)
    first = next(iter(maps.values()))
    size = first.patch_size_level0
    measured = list(zip(names[4:], columns[4:]))
    rows = [[float(v) for v in values] for values in zip(*[c.tolist() for _, c in measured])]

    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write('{"type": "FeatureCollection", "features": [\n')
            for i, (x, y) in enumerate(first.coords.tolist()):
                feature = {
                    "type": "Feature",
                    "geometry": {"type": "Polygon",
                                 "coordinates": [[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]]},
                    "properties": {"objectType": "detection", "name": f"patch {i}",
                                   "measurements": dict(zip((n for n, _ in measured), rows[i]))},
                }
                fh.write(("," if i else "") + json.dumps(feature, separators=(",", ":")) + "\n")
            fh.write("]}\n")

    return _atomic(Path(path), write)


# napari's colour maps offered for maps and exports, as 256-entry RGBA tables taken from napari
# (tests check they still match), so that exports look like the viewer without napari installed
COLORMAPS = ("inferno", "magma", "plasma", "viridis", "turbo")


def colormap_lut(name: str = "inferno") -> np.ndarray:
    """(256, 4) uint8 RGBA of one of ``COLORMAPS``."""
    if name not in COLORMAPS:
        raise NapariMilError(f"unknown colour map {name!r}; choose one of {', '.join(COLORMAPS)}")
    return _colormap_tables()[name].copy()


@functools.cache
def _colormap_tables() -> dict[str, np.ndarray]:
    with np.load(DATA_DIR / "colormaps.npz") as tables:
        return {name: tables[name] for name in COLORMAPS}


def render_overlay(amap: AttentionMap, dimensions: tuple[int, int], downsample: float, how: str = "minmax",
                   limits: tuple[float, float] | None = None, colormap: str = "inferno",
                   background: np.ndarray | None = None, opacity: float = 0.6,
                   max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """(H, W, 4) uint8 RGBA of the map over a slide of level-0 ``dimensions`` (width, height) at
    ``downsample`` level-0 pixels per output pixel; transparent where there is no patch, or
    blended over ``background`` (an RGB image of the slide at that size) with ``opacity``.
    Images of more than ``max_pixels`` are refused before they are made."""
    from PIL import Image

    if not (math.isfinite(downsample) and downsample > 0):
        raise NapariMilError(f"the downsample must be a positive number, not {downsample}")
    width, height = (max(1, round(d / downsample)) for d in dimensions)
    remedy = "choose a larger downsample, or raise the limit (--max-pixels) if the memory is there"
    check_pixels(width, height, max_pixels, f"a PNG of a {dimensions[0]} x {dimensions[1]} px slide at downsample "
                 f"{downsample:g}", remedy)
    step = amap.step_level0 / downsample
    cell_rows, cell_cols = amap.grid_index()[2]
    cells_w, cells_h = max(1, round(cell_cols * step)), max(1, round(cell_rows * step))
    check_pixels(cells_w, cells_h, max_pixels, f"the map's {len(amap)} patches at downsample {downsample:g}",
                 "are the coordinates those of this slide?")
    values = amap.image(how, max_pixels=max_pixels)
    low, high = limits or (float(np.nanmin(values)), float(np.nanmax(values)))
    scaled = np.clip((values - low) / (high - low if high > low else 1.0), 0, 1)
    lut = colormap_lut(colormap)
    rgba = lut[np.nan_to_num(scaled * 255, nan=0).round().astype(np.uint8)]
    rgba[np.isnan(values)] = 0
    cells = Image.fromarray(rgba).resize((cells_w, cells_h), Image.Resampling.NEAREST)
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    x0, y0 = amap.coords.min(0)
    canvas.paste(cells, (round(x0 / downsample), round(y0 / downsample)))
    out = np.asarray(canvas)
    if background is None:
        return out
    bg = np.asarray(Image.fromarray(np.asarray(background)[..., :3]).resize((width, height)), dtype=np.float32)
    alpha = out[..., 3:4].astype(np.float32) / 255 * opacity
    blended = bg * (1 - alpha) + out[..., :3].astype(np.float32) * alpha
    return np.concatenate([blended.round().astype(np.uint8), np.full((height, width, 1), 255, np.uint8)], -1)


def export_overlay_png(path: str | Path, amap: AttentionMap, dimensions: tuple[int, int], downsample: float,
                       **options) -> Path:
    """``render_overlay`` written as a PNG."""
    return _write_png(path, render_overlay(amap, dimensions, downsample, **options))


def _write_png(path: str | Path, image) -> Path:
    """An RGB(A) array or PIL image as a PNG, atomically."""
    from PIL import Image

    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    return _atomic(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def read_top_k(slide, amap: AttentionMap, k: int, side_px: int,
               max_pixels: int = MAX_PIXELS) -> list[tuple[int, np.ndarray]]:
    """The ``k`` highest-attention patches of ``amap``, highest first, as (index, RGB uint8 array)
    read from the slide level nearest ``side_px`` pixels a patch side (a read of more than
    ``max_pixels`` is refused before it is made)."""
    size0 = amap.patch_size_level0
    level = slide.best_level_for_downsample(size0 / side_px)
    side = max(1, round(size0 / slide.level_downsamples[level]))
    check_pixels(side, side, max_pixels, f"a top-k patch of {size0} level-0 px read at level {level}",
                 "the file's patch size does not fit this slide; is it the right slide?")
    return [(int(i), np.ascontiguousarray(slide.read_region(tuple(int(v) for v in amap.coords[i]), level,
                                                            (side, side))[..., :3]))
            for i in amap.top_k(k)]


def export_top_k(folder: str | Path, slide, amap: AttentionMap, k: int = 8, out_size: int = 256,
                 max_pixels: int = MAX_PIXELS) -> list[Path]:
    """The k highest-attention patches as PNGs, named by rank and level-0 position, read from
    the slide level closest to ``out_size`` pixels per patch (a read of more than ``max_pixels``
    is refused)."""
    from PIL import Image

    folder = Path(folder)
    check_name(amap.name, "map name")
    paths = []
    for rank, (i, pixels) in enumerate(read_top_k(slide, amap, k, out_size, max_pixels), start=1):
        x, y = (int(v) for v in amap.coords[i])
        patch = Image.fromarray(pixels)
        if patch.size != (out_size, out_size):
            patch = patch.resize((out_size, out_size), Image.Resampling.BILINEAR)
        paths.append(_write_png(folder / f"{amap.name}_rank{rank:03d}_x{x}_y{y}.png", patch))
    return paths


def export_formats(formats: str | Iterable[str]) -> list[str]:
    """The formats asked for (comma-separated or a list), in ``EXPORT_FORMATS`` order; unknown ones refused."""
    asked = set(formats.split(",") if isinstance(formats, str) else formats)
    unknown = asked - set(EXPORT_FORMATS)
    if unknown:
        raise NapariMilError(f"unknown format(s) {', '.join(sorted(unknown))}; use {', '.join(EXPORT_FORMATS)}")
    return [f for f in EXPORT_FORMATS if f in asked]


def export_attention_file(path: str | Path, out: str | Path, formats: str | Iterable[str] = "geojson,csv,png",
                          slide_path: str | Path | None = None, downsample: float = 32.0, norm: str = "minmax",
                          colormap: str = "inferno", k: int = 8, name: str | None = None,
                          max_pixels: int = MAX_PIXELS, force: bool = False) -> list[Path]:
    """An attention file (from predict) as QuPath GeoJSON, per-patch CSV, a PNG overlay and the
    top-k patches, named after the file under ``out``; returns the files written.

    The PNG covers the slide when ``slide_path`` is given, else the patches' extent; the top-k
    patches are read from the slide, so ``topk`` needs ``slide_path``. A slide whose name is not
    the one the file records, or that the patches do not fit, is refused unless ``force``.
    ``name`` names the map in the files (default: the file's name). Everything asked is checked
    before the first file is written.
    """
    from napari_mil.slide import open_slide

    formats = export_formats(formats)
    if "topk" in formats and not slide_path:
        raise NapariMilError("the top-k patches are read from the slide: give the slide file")
    colormap_lut(colormap)
    if norm not in NORMALISATIONS:
        raise NapariMilError(f"unknown normalisation {norm!r}; choose one of {', '.join(NORMALISATIONS)}")
    out, stem = Path(out), Path(path).stem
    amap, attrs = load_attention(path, name=check_name(name, "map name") if name else stem)
    slide = open_slide(slide_path) if slide_path else None
    try:
        if slide is not None and not force:
            _check_slide(Path(path).name, attrs, amap, slide)
        dims = slide.dimensions if slide else tuple(int(v) for v in amap.coords.max(0) + amap.patch_size_level0)
        if "png" in formats:  # rendered before any file is written: a map too large is refused first
            image = render_overlay(amap, dims, downsample, how=norm, colormap=colormap, max_pixels=max_pixels)
        maps = {amap.name: amap}
        written = []
        if "geojson" in formats:
            written.append(export_geojson(out / f"{stem}.geojson", maps))
        if "csv" in formats:
            written.append(export_csv(out / f"{stem}.csv", maps))
        if "png" in formats:
            written.append(_write_png(out / f"{stem}.png", image))
        if "topk" in formats:
            written += export_top_k(out / f"{stem}_top{k}", slide, amap, k, max_pixels=max_pixels)
    finally:
        if slide is not None:
            slide.close()
    return written


def _check_slide(file_name: str, attrs: dict, amap: AttentionMap, slide) -> None:
    """Refuse a slide that is not the one the attention file was made of: another name than the
    one it records, or patches that start outside it."""
    recorded = sorted({str(attrs[k]) for k in ("slide_id", "name") if attrs.get(k) not in (None, "", "None")})
    if recorded and slide.name not in recorded:
        raise NapariMilError(f"{file_name} is the attention of slide {' / '.join(recorded)}, not of {slide.name}: "
                             "give that slide's file, or --force to export over this one")
    w, h = slide.dimensions
    x, y = (int(v) for v in amap.coords.max(0))
    if amap.coords.min() < 0 or x >= w or y >= h:
        raise NapariMilError(f"{file_name} has patches up to ({x}, {y}), outside {slide.name} ({w} x {h} px): it is "
                             "the attention of another slide; give that slide's file, or --force")


PAIR_FORMATS = ("GeoJSON", "CSV", "PNG", "top-k")


def export_pair(folder: str | Path, fmt: str, slide, maps: dict[str, AttentionMap], how: str = "minmax",
                colormap: str = "inferno", k: int = 8, png_side: int = 2048) -> list[Path]:
    """Maps of one slide over the same patches (a teacher and its student) written to ``folder``
    as one of ``PAIR_FORMATS``: one GeoJSON or CSV holding every map, a PNG overlay per map
    (``png_side`` pixels on the slide's longer side, one colour range for all) or each map's
    top-``k`` patches. Files are named after the slide."""
    from napari_mil.heatmaps import shared_limits

    folder, stem = Path(folder), slide.name
    if fmt == "GeoJSON":
        return [export_geojson(folder / f"{stem}_teacher_student.geojson", maps)]
    if fmt == "CSV":
        return [export_csv(folder / f"{stem}_teacher_student.csv", maps)]
    if fmt == "PNG":
        limits = shared_limits(list(maps.values()), how)
        ds = max(slide.dimensions) / png_side
        return [export_overlay_png(folder / f"{stem}_{name}.png", amap, slide.dimensions, ds, how=how, limits=limits,
                                   colormap=colormap) for name, amap in maps.items()]
    if fmt == "top-k":
        return [p for amap in maps.values() for p in export_top_k(folder / f"{stem}_top{k}", slide, amap, k)]
    raise NapariMilError(f"unknown export format {fmt!r}: use one of {', '.join(PAIR_FORMATS)}")
