"""Attention maps: one value per patch plus the grid geometry, normalised for display.

A map is rendered one pixel per grid step: a small image whose ``scale`` and ``translate`` place
it on the slide in level-0 pixels (a full-resolution heatmap is never made). Normalisations:

- ``raw``: the attention weights themselves (a softmax over the bag: they sum to 1);
- ``minmax``: rescaled to [0, 1] between the bag's lowest and highest weight;
- ``rank``: percentile rank in [0, 1] (ties share their mean rank): the top patch is 1;
- ``log``: log10(N x a), the weight relative to uniform attention 1/N on a log scale:
  0 is average, 1 is ten times the average.

Attention files hold a map of one slide, as ``predict`` writes them and ``export`` reads them:

    <out>/attention/<slide>.h5
        coords     (N, 2) int64, level-0 (x, y) of each patch's top-left corner
        attention  (N,) float32, the model's attention (a softmax over the bag: it sums to 1)
        attrs: the patch geometry (``PatchGeometry.to_attrs``) and what the writer adds (model,
               probability of the last class, the slide's name, part, fold, checkpoint)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_mil.errors import NapariMilError, os_error_message
from napari_mil.geometry import PatchGeometry

NORMALISATIONS = ("raw", "minmax", "rank", "log")
NORMALISATION_LABELS = {"raw": "raw softmax", "minmax": "min-max", "rank": "percentile rank", "log": "log (× uniform)"}
MASK_KINDS = ("high", "low", "random")  # MHIM-MIL's masks: random-high, low, random
MASK_LABELS = {"high": "masked random-high", "low": "masked low", "random": "masked random"}
OUTLINE_CELL = 8  # pixels per patch side in mask outline images (a frame 1/8 of the patch wide)
MAX_PIXELS = 250_000_000  # the largest image made unless told otherwise: 1 GB as RGBA


class ImageTooLargeError(NapariMilError):
    """An image that would take more memory than the pixel limit allows."""


def check_pixels(width: int, height: int, max_pixels: int, what: str, remedy: str) -> None:
    """Refuse an image of more than ``max_pixels`` pixels before it is allocated."""
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{what} would be {width} x {height} pixels ({width * height / 1e6:,.0f} "
                                 f"megapixels, over the limit of {max_pixels / 1e6:,.0f}): {remedy}")


@dataclass
class AttentionMap:
    coords: np.ndarray  # (N, 2) level-0 (x, y) of each patch's top-left corner
    values: np.ndarray  # (N,) raw attention
    patch_size_level0: int  # patch extent in level-0 pixels
    step_level0: int | None = None  # grid spacing (patch size unless patches overlap)
    name: str = "attention"
    masked: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> (N,) bool
    geometry: PatchGeometry | None = None  # the whole geometry, when the map was made from one

    @classmethod
    def from_geometry(cls, coords: np.ndarray, values: np.ndarray, geometry: PatchGeometry, name: str = "attention",
                      masked: dict[str, np.ndarray] | None = None) -> AttentionMap:
        """A map over patches of ``geometry`` (a bag's or a grid's)."""
        return cls(coords, values, geometry.patch_size_level0, geometry.step_level0, name, dict(masked or {}), geometry)

    def __post_init__(self):
        self.coords = np.array(self.coords, dtype=np.int64).reshape(-1, 2)  # own read-only copies: what is
        self.values = np.array(self.values, dtype=np.float64).reshape(-1)  # derived from them is cached
        self.coords.flags.writeable = self.values.flags.writeable = False
        if len(self.coords) != len(self.values):
            raise NapariMilError(f"{len(self.values)} attention values for {len(self.coords)} patches: the map and "
                                 "the features come from different grids")
        if len(self.values) == 0:
            raise NapariMilError("an attention map needs at least one patch")
        if not np.isfinite(self.values).all():
            raise NapariMilError("the attention has NaN or infinite values")
        self.patch_size_level0 = int(self.patch_size_level0)
        self.step_level0 = int(self.step_level0 or self.patch_size_level0)
        g = self.geometry
        if g is not None and (g.patch_size_level0, g.step_level0) != (self.patch_size_level0, self.step_level0):
            raise NapariMilError(f"patches of {self.patch_size_level0} px every {self.step_level0} px do not fit the "
                                 f"geometry ({g.patch_size_level0} px every {g.step_level0} px)")
        for kind, flags in self.masked.items():
            if kind not in MASK_KINDS or len(flags) != len(self.values):
                raise NapariMilError(f"mask {kind!r} does not fit the map ({len(flags)} flags, {len(self.values)} patches)")
        self.masked = {k: np.asarray(v, dtype=bool) for k, v in self.masked.items()}

    def __len__(self) -> int:
        return len(self.values)

    # ---- values ------------------------------------------------------------------------------
    # Maps are not changed after they are made (a new epoch makes new maps), so what is derived
    # from values and coords is computed once: a normalisation switch or a hover over a 100k-patch
    # map then costs an image fill, not a sort.
    def normalised(self, how: str = "minmax") -> np.ndarray:
        """(N,) float32 values under the normalisation ``how`` (read-only)."""
        cache = self.__dict__.setdefault("_normalised", {})
        if how not in cache:
            cache[how] = self._normalise(how)
            cache[how].flags.writeable = False
        return cache[how]

    def _normalise(self, how: str) -> np.ndarray:
        a = self.values
        if how == "raw":
            out = a
        elif how == "minmax":
            span = a.max() - a.min()
            out = (a - a.min()) / span if span > 0 else np.full_like(a, 0.5)
        elif how == "rank":
            out = (self.ranks(ascending=True) - 1) / max(len(a) - 1, 1)
        elif how == "log":
            out = np.log10(np.clip(a, 1e-12, None) * len(a))
        else:
            raise NapariMilError(f"unknown normalisation {how!r}; choose one of {', '.join(NORMALISATIONS)}")
        return out.astype(np.float32)

    def ranks(self, ascending: bool = False) -> np.ndarray:
        """(N,) rank of each patch, 1 = highest attention (``ascending``: 1 = lowest); ties share
        their mean rank."""
        if "_ascending_ranks" not in self.__dict__:
            order = np.argsort(self.values, kind="stable")
            ordered = self.values[order]
            starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first position of each tie group
            ends = np.r_[starts[1:], len(ordered)]
            group = np.repeat(np.arange(len(starts)), ends - starts)
            ranks = np.empty(len(ordered))
            ranks[order] = ((starts + 1 + ends) / 2)[group]  # the mean of the 1-based positions starts+1 .. ends
            ranks.flags.writeable = False
            self._ascending_ranks = ranks
        return self._ascending_ranks if ascending else len(self.values) + 1 - self._ascending_ranks

    def top_k(self, k: int) -> np.ndarray:
        """Indices of the k patches with the highest attention, highest first."""
        k = min(max(int(k), 0), len(self.values))
        idx = np.argpartition(-self.values, k - 1)[:k] if 0 < k < len(self.values) else np.arange(len(self.values))
        return idx[np.argsort(-self.values[idx], kind="stable")][:k]

    # ---- rendering -----------------------------------------------------------------------------
    def grid_index(self) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Row and column of each patch in the one-pixel-per-step image, and its shape."""
        if "_grid_index" not in self.__dict__:
            origin = self.coords.min(0)
            col, row = ((self.coords - origin) // self.step_level0).T
            self._grid_index = row, col, (int(row.max()) + 1, int(col.max()) + 1)
        return self._grid_index

    def check_size(self, max_pixels: int = MAX_PIXELS, cell: int = 1) -> None:
        """Refuse a map whose patches are spread so far for their grid step (a damaged file: a
        coordinate at 1e8) that its image, ``cell`` pixels per patch side, passes ``max_pixels``."""
        h, w = self.grid_index()[2]
        check_pixels(w * cell, h * cell, max_pixels, f"the map of {len(self)} patches every {self.step_level0} px",
                     "its coordinates span far more than a slide; is the file damaged?")

    def image(self, how: str = "minmax", values: np.ndarray | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """(H, W) float32, one pixel per grid step, NaN where there is no patch."""
        self.check_size(max_pixels)
        row, col, shape = self.grid_index()
        img = np.full(shape, np.nan, dtype=np.float32)
        img[row, col] = self.normalised(how) if values is None else values
        return img

    def mask_image(self, kind: str) -> np.ndarray:
        """(H, W) uint8 labels: 1 where the patch was masked by ``kind``, else 0."""
        self.check_size()
        row, col, shape = self.grid_index()
        img = np.zeros(shape, dtype=np.uint8)
        flags = self.masked.get(kind)
        if flags is not None:
            img[row[flags], col[flags]] = 1
        return img

    def mask_outlines(self, kind: str, cell: int = OUTLINE_CELL) -> np.ndarray:
        """(H * cell, W * cell) uint8: 1 on a one-pixel frame around each patch's cell that ``kind``
        masked, else 0; ``placement(cell)`` puts it over the slide. One image however many patches
        are masked, so it draws as fast for 100k patches as for 100."""
        self.check_size(cell=cell)
        mask = self.mask_image(kind).astype(bool)
        frame = np.ones((cell, cell), bool)
        frame[1:-1, 1:-1] = False
        h, w = mask.shape
        return (mask[:, None, :, None] & frame[None, :, None, :]).reshape(h * cell, w * cell).view(np.uint8)

    def placement(self, upsample: int = 1) -> tuple[tuple[float, float], tuple[float, float]]:
        """napari ``scale`` and ``translate`` (y, x) that put the image's pixel of a patch over the
        first ``step`` level-0 pixels of that patch (the slide's pixel i spans [i - 0.5, i + 0.5]);
        with ``upsample`` k, for an image of k x k pixels per patch."""
        s = float(self.step_level0) / upsample
        x0, y0 = self.coords.min(0)
        return (s, s), (y0 + s / 2 - 0.5, x0 + s / 2 - 0.5)

    def patch_at(self, y: float, x: float) -> int | None:
        """Index of the patch whose cell covers level-0 position (y, x), or None."""
        row, col, shape = self.grid_index()
        x0, y0 = self.coords.min(0)
        r, c = int(np.floor((y + 0.5 - y0) / self.step_level0)), int(np.floor((x + 0.5 - x0) / self.step_level0))
        if not (0 <= r < shape[0] and 0 <= c < shape[1]):
            return None
        hits = np.flatnonzero((row == r) & (col == c))
        return int(hits[0]) if len(hits) else None


def shared_limits(maps: list[AttentionMap], how: str) -> tuple[float, float]:
    """Contrast limits common to several maps (for one colour bar over teacher and student)."""
    lows, highs = zip(*[(float(v.min()), float(v.max())) for v in (m.normalised(how) for m in maps)])
    if how in ("minmax", "rank"):
        return 0.0, 1.0
    if how == "raw":
        return 0.0, max(max(highs), 1e-12)
    low, high = min(lows), max(highs)
    return (low, high) if high > low else (low - 1.0, high + 1.0)


# ---- attention files ------------------------------------------------------------------------
class AttentionFileError(NapariMilError):
    """A file that is not an attention file."""


def save_attention(path: str | os.PathLike, amap: AttentionMap, attrs: dict | None = None) -> Path:
    """Write a map as an attention file, atomically: its coordinates, values and geometry (the
    patches' level-0 size and step where the map has no whole geometry), then ``attrs`` as they
    are (None values are left out)."""
    import h5py

    from napari_mil.atomic import atomic_path

    path = Path(path)
    if amap.geometry is not None:
        geometry = amap.geometry.to_attrs()
    else:
        geometry = {"patch_size_level0": amap.patch_size_level0, "step_level0": amap.step_level0}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        fh.create_dataset("coords", data=amap.coords)
        fh.create_dataset("attention", data=amap.values.astype(np.float32))
        fh.attrs.update(geometry)
        for key, value in (attrs or {}).items():
            if value is not None:
                fh.attrs[key] = value
    return path


def load_attention(path: str | os.PathLike, name: str | None = None) -> tuple[AttentionMap, dict]:
    """The file's map (named ``name``, else after the file) and its attrs. The geometry is read
    from the attrs; files without one take the coordinates' spacing as the patch size."""
    import h5py

    from napari_mil._h5 import plain_attr

    path = Path(path)
    if not path.is_file():
        raise AttentionFileError(f"{path} does not exist" if not path.exists() else f"{path} is a folder, not a file")
    try:
        with h5py.File(path, "r") as fh:
            coords, values = fh["coords"][:], fh["attention"][:]
            attrs = {k: plain_attr(v) for k, v in fh.attrs.items()}
    except OSError as exc:
        if exc.errno is not None:  # the file system's error, not the file's content
            raise AttentionFileError(os_error_message(exc, path)) from None
        raise AttentionFileError(f"{path}: not an attention file ({exc})") from None
    except KeyError as exc:
        raise AttentionFileError(f"{path}: not an attention file ({exc})") from None
    try:
        geometry = PatchGeometry.from_attrs(attrs, coords)
        return AttentionMap.from_geometry(coords, values, geometry, name=name or path.stem), attrs
    except NapariMilError as exc:
        raise AttentionFileError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:  # coordinates or values that are not numbers
        raise AttentionFileError(f"{path}: not an attention file ({exc})") from None
