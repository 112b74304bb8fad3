"""Patch geometry: what places a bag's patches on the slide.

A grid, a feature file and an attention file carry the same facts: the patch side at the target
resolution and in level-0 pixels, the grid step in level-0 pixels, the overlap, and the
resolution they were cut at. ``PatchGeometry`` holds them typed; ``to_attrs`` writes them under
TRIDENT's names (``patch_size``, ``patch_size_level0``, ``overlap``, ``level0_magnification``,
``target_magnification``) plus napari-mil's (``step_level0``, ``mpp``, ``level0_mpp``,
``patch_level``), and ``from_attrs`` reads napari-mil's, TRIDENT's and CLAM's files, deriving
what they leave out.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

from napari_mil.errors import GridError


def grid_step(patch_size: int, patch_size_level0: int, overlap: int = 0) -> int:
    """Level-0 pixels between neighbouring patches: the patch side less the overlap, scaled to level 0."""
    return max(1, int(round((patch_size - overlap) * patch_size_level0 / patch_size)))


@dataclass(frozen=True)
class PatchGeometry:
    patch_size: int  # pixels at the target resolution (what an encoder sees)
    patch_size_level0: int  # extent in level-0 pixels
    step_level0: int  # grid spacing in level-0 pixels (the patch extent unless patches overlap)
    overlap: int = 0  # pixels at the target resolution shared by neighbours
    level0_mpp: float | None = None
    target_mpp: float | None = None
    level0_magnification: float | None = None
    target_magnification: float | None = None
    level: int | None = None  # pyramid level read

    def __post_init__(self):
        """Checked and normalised; anything else than what the fields say is a GridError."""
        for name in ("patch_size", "patch_size_level0", "step_level0"):
            object.__setattr__(self, name, _whole(getattr(self, name), name, 1))
        object.__setattr__(self, "overlap", _whole(self.overlap, "overlap", 0))
        if not self.overlap < self.patch_size:
            raise GridError(f"overlap must be in [0, patch size), got {self.overlap} for {self.patch_size} px patches")
        for name in ("level0_mpp", "target_mpp", "level0_magnification", "target_magnification"):
            number = _number(getattr(self, name))  # what files write for "unknown" (NaN, "None", 0) is None
            object.__setattr__(self, name, number if number is not None and 0 < number < math.inf else None)
        if self.level is not None:
            object.__setattr__(self, "level", _whole(self.level, "level", 0))

    def to_attrs(self) -> dict:
        """The HDF5 attrs: TRIDENT's names, then napari-mil's; unknown resolutions are NaN."""
        attrs = {
            # TRIDENT
            "patch_size": self.patch_size,
            "patch_size_level0": self.patch_size_level0,
            "overlap": self.overlap,
            "level0_magnification": _nan(self.level0_magnification),
            "target_magnification": _nan(self.target_magnification),
            # napari-mil
            "step_level0": self.step_level0,
            "mpp": _nan(self.target_mpp),
            "level0_mpp": _nan(self.level0_mpp),
        }
        if self.level is not None:
            attrs["patch_level"] = self.level
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict, coords: np.ndarray) -> PatchGeometry:
        """The geometry of a file from its attrs and coordinates: napari-mil's and TRIDENT's
        ``patch_size_level0`` (with ``patch_size`` and ``overlap`` for the step), CLAM's patch
        files (``patch_size`` at ``patch_level`` and its ``downsample``), and files with
        coordinates only (CLAM's feature files), whose grid spacing is taken as the patch size
        and the step. Raises GridError when nothing tells (a single patch without attrs)."""
        mags = {
            "level0_mpp": attrs.get("level0_mpp"),
            "target_mpp": attrs.get("mpp"),
            "level0_magnification": attrs.get("level0_magnification"),
            "target_magnification": attrs.get("target_magnification"),
            "level": _number(attrs.get("patch_level")),
        }
        if _number(attrs.get("patch_size_level0")) is not None:  # napari-mil, TRIDENT
            size0 = _whole(attrs["patch_size_level0"], "patch_size_level0", 1)
            size = _whole(_number(attrs.get("patch_size")) or size0, "patch_size", 1)
            overlap = _whole(_number(attrs.get("overlap")) or 0, "overlap", 0)
            step = _number(attrs.get("step_level0"))
            return cls(size, size0, step if step else grid_step(size, size0, overlap), overlap, **mags)
        downsample = np.atleast_1d(attrs["downsample"]).reshape(-1) if "downsample" in attrs else np.zeros(0)
        if _number(attrs.get("patch_size")) is not None and mags["level"] is not None and len(downsample):
            size = _whole(attrs["patch_size"], "patch_size", 1)  # CLAM: at patch_level, no overlap
            factor = _number(downsample[0])
            if factor is None or not 0 < factor < math.inf:
                raise GridError(f"downsample must be a positive number, got {downsample[0]!r}")
            size0 = size * factor
            size0 = _whole(round(size0) if math.isfinite(size0) else size0, "patch_size_level0", 1)
            return cls(size, size0, size0, 0, **mags)
        try:
            coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        except (TypeError, ValueError, OverflowError):
            raise GridError("the patch coordinates are not whole numbers") from None
        gaps = [np.diff(np.unique(coords[:, axis])) for axis in (0, 1)]
        gaps = np.concatenate([g[g > 0] for g in gaps])
        if not len(gaps):
            raise GridError("cannot tell the patch size: the file has no patch_size_level0 and a single patch")
        step = int(gaps.min())
        return cls(step, step, step, 0, **mags)


MAX_SIDE = 2**31 - 1  # level-0 pixels: more than any slide has, and what int32 readers hold


def _whole(value, name: str, low: int) -> int:
    """``value`` as an int from ``low`` to MAX_SIDE: whole numbers only (256.0 yes, 2.5 no)."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        number = operator.index(value) if isinstance(value, (int, np.integer)) else float(value)
    except (TypeError, ValueError):
        raise GridError(f"{name} must be a whole number, got {value!r}") from None
    if isinstance(number, float):
        if not number.is_integer():  # also NaN and infinities
            raise GridError(f"{name} must be a whole number, got {value!r}")
        number = int(number)
    if not low <= number <= MAX_SIDE:
        raise GridError(f"{name} must be from {low} to {MAX_SIDE}, got {number}")
    return number


def _number(value) -> float | None:
    """A float, or None for a missing or NaN attr or a string such as "None" (older files wrote None so)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
