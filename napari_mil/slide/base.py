"""The Slide: a lazy, backend-independent view of a whole-slide image."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from napari_mil.errors import InvalidMppError, MissingMppError, SlideReadError

# Scanners record roughly 0.1-1 µm/px at 10-100x, and low-power scans reach a few µm/px.
# Anything outside this range is a unit error (dpi left at 72, cm read as inch, ...).
MPP_RANGE = (0.05, 20.0)

# Extensions OpenSlide reads (vendor formats, generic tiled TIFF and DICOM WSI).
OPENSLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
)
# Extensions the tifffile fallback reads (plain and OME TIFF).
TIFF_EXTENSIONS = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf")
SLIDE_EXTENSIONS = tuple(sorted(set(OPENSLIDE_EXTENSIONS) | set(TIFF_EXTENSIONS)))
# The same as file-name patterns, for the reader's manifest and the file dialogs ("*.tif" covers ".ome.tif").
SLIDE_FILE_PATTERNS = tuple(f"*{ext}" for ext in SLIDE_EXTENSIONS
                            if not any(ext != other and ext.endswith(other) for other in SLIDE_EXTENSIONS))


def is_slide_path(path: str | os.PathLike) -> bool:
    """Whether the file name has an extension this package opens."""
    name = str(path).lower()
    return any(name.endswith(ext) for ext in SLIDE_EXTENSIONS)


def validate_mpp(mpp: float, source: str = "mpp") -> float:
    """Return mpp as float or raise InvalidMppError naming the accepted range."""
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise InvalidMppError(f"{source} {mpp!r} is not a number of µm per pixel") from None
    lo, hi = MPP_RANGE
    if not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidMppError(
            f"{source} {mpp!r} µm/px is outside the plausible range {lo}-{hi} µm/px "
            "(40x scans are about 0.25, 20x about 0.5)"
        )
    return value


class Backend(Protocol):
    """What a slide reader library must provide."""

    name: str
    level_dimensions: list[tuple[int, int]]  # (width, height) per level
    level_downsamples: list[float]
    tile_sizes: list[tuple[int, int]]  # (tile height, tile width) per level
    properties: dict[str, str]
    recorded_mpp: float | None
    objective_power: float | None

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) for a region whose top-left is in level-0 pixels."""

    def associated_image_names(self) -> list[str]: ...

    def read_associated_image(self, name: str) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class Slide:
    """A whole-slide image opened for reading.

    ``mpp`` is µm per level-0 pixel, or None when the file records none (or an implausible
    value) and the caller gave none. Code that needs physical units calls ``require_mpp()``.
    """

    path: Path
    backend: Backend
    mpp: float | None
    mpp_source: str  # "slide", "user" or "missing"
    mpp_note: str = ""
    _associated: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    # ---- geometry -------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Slide id: the file name without its (possibly double) extension."""
        name = self.path.name
        for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
            if name.lower().endswith(ext):
                return name[: -len(ext)]
        return self.path.stem

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.backend.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.backend.level_dimensions)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return list(self.backend.level_dimensions)

    @property
    def level_downsamples(self) -> list[float]:
        return list(self.backend.level_downsamples)

    @property
    def tile_sizes(self) -> list[tuple[int, int]]:
        return list(self.backend.tile_sizes)

    @property
    def properties(self) -> dict[str, str]:
        return dict(self.backend.properties)

    def require_mpp(self) -> float:
        """µm per level-0 pixel, or a MissingMppError telling the user how to supply it."""
        if self.mpp is None:
            reason = f" ({self.mpp_note})" if self.mpp_note else ""
            raise MissingMppError(
                f"{self.path.name} records no usable µm per pixel{reason}; "
                "enter it in the Slide & tissue dock or pass --mpp on the command line"
            )
        return self.mpp

    @property
    def magnification(self) -> float | None:
        """Objective magnification of level 0: the scanner's value, else 10 / mpp."""
        if self.backend.objective_power:
            return float(self.backend.objective_power)
        if self.mpp is not None:
            return round(10.0 / self.mpp, 2)
        return None

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (1% slack)."""
        best = 0
        for i, ds in enumerate(self.backend.level_downsamples):
            if ds <= downsample * 1.01:
                best = i
        return best

    # ---- pixels ---------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array (h, w, 3); ``location`` is (x, y) in level-0 pixels, ``size`` (w, h).

        Raises SlideReadError, naming the slide and the region, when the pixels cannot be read
        (damaged tile data, a file changed on disk, a region too large for memory).
        """
        if not 0 <= level < self.level_count:
            raise IndexError(f"level {level} out of range 0..{self.level_count - 1}")
        try:
            return self.backend.read_region(location, level, size)
        except SlideReadError:
            raise
        except Exception as exc:  # OpenSlideError, codec errors, MemoryError, ...: all the file's fault
            where = f"level {level} at ({int(location[0])}, {int(location[1])}), {int(size[0])} x {int(size[1])} px"
            raise SlideReadError(f"{self.path.name}: cannot read the region {where}: {type(exc).__name__}: {exc}") from exc

    def read_level(self, level: int) -> np.ndarray:
        """A whole level as RGB (only sensible for the small, low-resolution levels)."""
        w, h = self.backend.level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))

    @property
    def associated_images(self) -> dict[str, np.ndarray]:
        """Label, macro and thumbnail images as RGB arrays, read once."""
        for name in self.backend.associated_image_names():
            if name not in self._associated:
                try:
                    self._associated[name] = self.backend.read_associated_image(name)
                except Exception:  # a damaged label image must not stop the slide opening
                    continue
        return dict(self._associated)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
