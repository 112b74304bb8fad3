"""The patch grid: level-0 coordinates of tissue patches at a target magnification or µm/px.

The grid reads the finest-needed pyramid level (the coarsest one that is not coarser than the
target) and resizes patches from ``patch_size_level`` to ``patch_size`` when the target falls
between levels. Grids are saved as HDF5 in the coords layout of TRIDENT and CLAM (dataset
``coords``, N x 2, level-0 (x, y), with the geometry in its attrs), and their files load too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_mil._h5 import plain_attr
from napari_mil.atomic import atomic_path
from napari_mil.errors import GridError, NoTissueError
from napari_mil.geometry import PatchGeometry, grid_step
from napari_mil.slide.base import Slide
from napari_mil.slide.thumbnail import read_downsampled
from napari_mil.tissue import TissueMask

MIN_PATCH_SIZE = 8  # pixels at the target: smaller patches show an encoder nothing


@dataclass(eq=False)
class PatchGrid:
    """Patch top-left corners in level-0 pixels plus the geometry that makes them unambiguous."""

    coords: np.ndarray  # (N, 2) int64, level-0 (x, y)
    tissue_fraction: np.ndarray  # (N,) float32, fraction of each patch covered by the mask
    patch_size: int  # pixels at the target resolution (what an encoder sees)
    patch_size_level0: int  # extent in level-0 pixels
    level: int  # pyramid level read
    patch_size_level: int  # extent in pixels at that level (resized to patch_size)
    level_downsample: float
    overlap: int  # pixels at the target resolution shared by neighbours
    target_mpp: float | None
    target_magnification: float | None
    level0_mpp: float | None
    level0_magnification: float | None
    slide_name: str = ""
    slide_dimensions: tuple[int, int] = (0, 0)  # level-0 (width, height)
    extra: dict = field(default_factory=dict)  # attrs kept with the grid: "grid_settings", what tiled it

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def geometry(self) -> PatchGeometry:
        """The patches' geometry, as feature and attention files carry it."""
        return PatchGeometry(
            patch_size=self.patch_size, patch_size_level0=self.patch_size_level0,
            step_level0=grid_step(self.patch_size, self.patch_size_level0, self.overlap), overlap=self.overlap,
            level0_mpp=self.level0_mpp, target_mpp=self.target_mpp, level0_magnification=self.level0_magnification,
            target_magnification=self.target_magnification, level=self.level,
        )

    @property
    def step_level0(self) -> int:
        return grid_step(self.patch_size, self.patch_size_level0, self.overlap)

    def attrs(self) -> dict:
        """The HDF5 attrs: the geometry (TRIDENT's names and ours), the slide's name, CLAM's names
        and the read level's details."""
        level_w = int(round(self.slide_dimensions[0] / self.level_downsample))
        level_h = int(round(self.slide_dimensions[1] / self.level_downsample))
        return {
            **self.geometry.to_attrs(),
            "name": self.slide_name,  # TRIDENT
            # CLAM (its patch_size is at patch_level; ours is stored as patch_size_level)
            "patch_level": self.level,
            "downsample": np.array([self.level_downsample, self.level_downsample]),
            "downsampled_level_dim": np.array([level_w, level_h]),
            "level_dim": np.array(self.slide_dimensions),
            # napari-mil
            "patch_size_level": self.patch_size_level,
            "level_downsample": self.level_downsample,
            "coords_reference": "level0_top_left_xy",
            "generator": "napari-mil",
            **self.extra,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the grid to HDF5 atomically (a temporary file renamed into place)."""
        import h5py

        with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
            ds = fh.create_dataset("coords", data=self.coords.astype(np.int64))
            for key, value in self.attrs().items():
                ds.attrs[key] = value
            fh.create_dataset("tissue_fraction", data=self.tissue_fraction.astype(np.float32))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, slide: Slide | None = None) -> PatchGrid:
        """Read a grid written by napari-mil, TRIDENT (``*_patches.h5``) or CLAM (``patches/*.h5``).

        CLAM files record only the read level's downsample, so their magnification and mpp
        are filled in from ``slide`` when it is given.
        """
        import h5py

        with h5py.File(path, "r") as fh:
            if "coords" not in fh:
                raise GridError(f"{path} has no 'coords' dataset: not a patch-coordinates file")
            coords = np.asarray(fh["coords"][:], dtype=np.int64).reshape(-1, 2)
            a = {k: plain_attr(v) for k, v in fh["coords"].attrs.items()}
            fraction = (
                np.asarray(fh["tissue_fraction"][:], np.float32)
                if "tissue_fraction" in fh
                else np.ones(len(coords), np.float32)
            )
        slide_mpp = slide.mpp if slide is not None else None
        slide_mag = slide.magnification if slide is not None else None
        dims = tuple(int(v) for v in a.get("level_dim", slide.dimensions if slide else (0, 0)))
        name = str(a.get("name", Path(path).stem.removesuffix("_patches")))
        if "patch_size_level0" in a:  # napari-mil or TRIDENT
            ps, ps0 = int(a["patch_size"]), int(a["patch_size_level0"])
            mag0 = _num(a.get("level0_magnification")) or slide_mag
            target_mag = _num(a.get("target_magnification"))
            level = int(a.get("patch_level", 0))
            level_ds = float(a.get("level_downsample", slide.level_downsamples[level] if slide else 1.0))
            ps_level = int(a.get("patch_size_level", round(ps0 / level_ds)))
            mpp0 = _num(a.get("level0_mpp")) or slide_mpp
            target_mpp = _num(a.get("mpp")) or (mpp0 * ps0 / ps if mpp0 else None)
            overlap = int(a.get("overlap", 0))
        elif "patch_level" in a:  # CLAM
            level = int(a["patch_level"])
            ds = np.atleast_1d(a.get("downsample", [1.0]))
            level_ds = float(ds[0])
            ps_level = int(a["patch_size"])
            ps = ps_level
            ps0 = int(round(ps_level * level_ds))
            mag0, mpp0 = slide_mag, slide_mpp
            target_mag = mag0 / level_ds if mag0 else None
            target_mpp = mpp0 * level_ds if mpp0 else None
            overlap = 0
        else:
            raise GridError(
                f"{path}: coords attrs name no patch size (expected TRIDENT's patch_size_level0 "
                "or CLAM's patch_level)"
            )
        return cls(
            coords=coords, tissue_fraction=fraction, patch_size=ps, patch_size_level0=ps0, level=level,
            patch_size_level=ps_level, level_downsample=level_ds, overlap=overlap, target_mpp=target_mpp,
            target_magnification=target_mag, level0_mpp=mpp0, level0_magnification=mag0,
            slide_name=name, slide_dimensions=dims,
            extra={k: a[k] for k in ("grid_settings",) if k in a},
        )


def _num(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else value


def target_downsample(slide: Slide, target_mpp: float | None = None, magnification: float | None = None) -> float:
    """Level-0 pixels per target pixel for a target µm/px or magnification (exactly one)."""
    if (target_mpp is None) == (magnification is None):
        raise GridError("give exactly one of a target µm per pixel or a target magnification")
    mpp0 = slide.require_mpp()
    if target_mpp is not None:
        if target_mpp <= 0:
            raise GridError(f"target mpp must be positive, got {target_mpp}")
        ds = target_mpp / mpp0
        asked = f"{target_mpp:g} µm/px"
        have = f"{mpp0:g} µm/px"
    else:
        if magnification <= 0:
            raise GridError(f"target magnification must be positive, got {magnification}")
        mag0 = slide.magnification
        ds = mag0 / magnification
        asked = f"{magnification:g}x"
        have = f"{mag0:g}x"
    if ds < 1.0 - 1e-2:
        raise GridError(
            f"target {asked} is finer than the scan ({have}); napari-mil does not upsample: "
            "choose a lower magnification or a larger µm/px"
        )
    return max(ds, 1.0)


def _summed_area(mask: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero row and column in front: S[i, j] = mask[:i, :j].sum()."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    table[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    return table


def _area_below(table: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Mask area in [0, y) x [0, x) for fractional mask coordinates (bilinear in the table)."""
    h, w = table.shape[0] - 1, table.shape[1] - 1
    y = np.clip(y, 0, h)
    x = np.clip(x, 0, w)
    y0 = np.minimum(np.floor(y).astype(np.int64), h - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), w - 1)
    fy, fx = y - y0, x - x0
    s00, s01 = table[y0, x0], table[y0, x0 + 1]
    s10, s11 = table[y0 + 1, x0], table[y0 + 1, x0 + 1]
    return s00 * (1 - fy) * (1 - fx) + s01 * (1 - fy) * fx + s10 * fy * (1 - fx) + s11 * fy * fx


def tissue_fractions(mask: TissueMask, coords: np.ndarray, size_level0: int) -> np.ndarray:
    """Exact fraction of each level-0 square (x, y, size) covered by the piecewise-constant mask."""
    table = _summed_area(mask.mask)
    sy, sx = mask.downsample
    x0 = coords[:, 0] / sx
    y0 = coords[:, 1] / sy
    x1 = (coords[:, 0] + size_level0) / sx
    y1 = (coords[:, 1] + size_level0) / sy
    area = _area_below(table, y1, x1) - _area_below(table, y0, x1) - _area_below(table, y1, x0) + _area_below(table, y0, x0)
    return (area / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def make_patch_grid(
    slide: Slide,
    mask: TissueMask,
    patch_size: int = 256,
    target_mpp: float | None = None,
    magnification: float | None = None,
    overlap: int = 0,
    min_tissue: float = 0.5,
) -> PatchGrid:
    """Tile the tissue: patches of ``patch_size`` px at the target, keeping those whose mask
    coverage is at least ``min_tissue`` (any tissue at all when 0).

    The default target is 20x when neither ``target_mpp`` nor ``magnification`` is given.
    """
    if target_mpp is None and magnification is None:
        magnification = 20.0
    if patch_size < MIN_PATCH_SIZE:
        raise GridError(f"patch size {patch_size} px is too small (at least {MIN_PATCH_SIZE})")
    if not 0 <= overlap < patch_size:
        raise GridError(f"overlap must be in [0, patch size), got {overlap} for {patch_size} px patches")
    if not 0.0 <= min_tissue <= 1.0:
        raise GridError(f"minimum tissue fraction must be within 0-1, got {min_tissue}")
    ds = target_downsample(slide, target_mpp, magnification)
    mpp0 = slide.require_mpp()
    w0, h0 = slide.dimensions
    size0 = int(round(patch_size * ds))
    if size0 > w0 or size0 > h0:
        raise GridError(
            f"a {patch_size} px patch at {mpp0 * ds:.3g} µm/px spans {size0} level-0 px, more than the "
            f"slide ({w0} x {h0} px): choose a smaller patch or a higher magnification"
        )
    level = slide.best_level_for_downsample(ds)
    level_ds = slide.level_downsamples[level]
    size_level = int(round(patch_size * ds / level_ds))
    step0 = grid_step(patch_size, size0, overlap)  # the step the geometry records

    if not mask.mask.any():
        raise NoTissueError(
            f"no tissue on {slide.name}: nothing to tile (detect with the 'biopsy' preset, "
            "lower the threshold, or paint tissue into the mask)"
        )
    # restrict candidates to the mask's bounding box, expanded by one patch
    rows = np.flatnonzero(mask.mask.any(axis=1))
    cols = np.flatnonzero(mask.mask.any(axis=0))
    sy, sx = mask.downsample
    bx0, bx1 = cols[0] * sx - size0, (cols[-1] + 1) * sx
    by0, by1 = rows[0] * sy - size0, (rows[-1] + 1) * sy
    xs = np.arange(0, w0 - size0 + 1, step0)
    ys = np.arange(0, h0 - size0 + 1, step0)
    xs = xs[(xs > bx0) & (xs < bx1)]
    ys = ys[(ys > by0) & (ys < by1)]
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    fraction = tissue_fractions(mask, coords, size0) if len(coords) else np.zeros(0, np.float32)
    keep = fraction >= min_tissue - 1e-6 if min_tissue > 0 else fraction > 0
    coords, fraction = coords[keep], fraction[keep]
    if len(coords) == 0:
        raise NoTissueError(
            f"no patch of {slide.name} reaches {min_tissue:.0%} tissue: lower the minimum tissue "
            "fraction or the patch size"
        )
    return PatchGrid(
        coords=coords, tissue_fraction=fraction, patch_size=patch_size, patch_size_level0=size0,
        level=level, patch_size_level=size_level, level_downsample=level_ds, overlap=overlap,
        target_mpp=mpp0 * ds, target_magnification=(slide.magnification / ds) if slide.magnification else None,
        level0_mpp=mpp0, level0_magnification=slide.magnification, slide_name=slide.name,
        slide_dimensions=(w0, h0),
    )


def read_patch(slide: Slide, grid: PatchGrid, index: int, out_size: int | None = None) -> np.ndarray:
    """The patch read at ``grid.level`` and resized to ``patch_size`` (or straight to
    ``out_size``, e.g. an encoder's input side, in one resampling step)."""
    from PIL import Image

    x, y = grid.coords[index]
    size_level, size = grid.patch_size_level, out_size or grid.patch_size
    img = slide.read_region((int(x), int(y)), grid.level, (size_level, size_level))
    if size_level != size:
        pil = Image.fromarray(np.ascontiguousarray(img))
        if size_level % size == 0:  # integer factor: area average
            pil = pil.reduce(size_level // size)
        else:
            pil = pil.resize((size, size), Image.Resampling.BILINEAR)
        img = np.asarray(pil)
    return img


def render_grid_preview(slide: Slide, mask: TissueMask | None, grid: PatchGrid | None, max_size: int = 2048) -> np.ndarray:
    """RGB overview for review: the slide, the tissue outline in green, patches in cyan."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    w0, h0 = slide.dimensions
    ds = max(w0, h0) / max_size if max(w0, h0) > max_size else 1.0
    level = slide.best_level_for_downsample(ds)
    out_w, out_h = max(1, int(round(w0 / ds))), max(1, int(round(h0 / ds)))
    base = Image.fromarray(read_downsampled(slide, level, (out_w, out_h)))  # block by block: bounded memory
    if mask is not None and mask.mask.any():
        small = np.asarray(Image.fromarray(mask.mask.astype(np.uint8) * 255).resize((out_w, out_h), Image.Resampling.NEAREST)) > 0
        edge = small & ~ndimage.binary_erosion(small, iterations=2)
        arr = np.asarray(base).copy()
        arr[edge] = (0, 200, 0)
        base = Image.fromarray(arr)
    if grid is not None and len(grid):
        draw = ImageDraw.Draw(base)
        size = grid.patch_size_level0 / ds
        for x, y in grid.coords / ds:
            draw.rectangle([x, y, x + size - 1, y + size - 1], outline=(0, 229, 255))
    return np.asarray(base)
