"""tifffile backend: plain and OME TIFF that OpenSlide rejects (untiled, OME pyramids, ...)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from napari_mil.errors import SlideOpenError, SlideReadError
from napari_mil.slide.base import TIFF_EXTENSIONS

# An untiled level is decoded whole on first read; refuse ones that would not fit in memory.
MAX_UNTILED_BYTES = 2 * 1024**3


def can_try(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(TIFF_EXTENSIONS)


def _mpp_from_ome(tf) -> float | None:
    if not tf.is_ome or not tf.ome_metadata:
        return None
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(tf.ome_metadata)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
            size = float(el.attrib["PhysicalSizeX"])
            unit = el.attrib.get("PhysicalSizeXUnit", "µm")
            factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit)
            return size * factor if factor else None
    return None


def _mpp_from_resolution(page) -> float | None:
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    num, den = tags["XResolution"].value
    if not num or not den:
        return None
    pixels_per_unit = num / den
    unit = int(tags["ResolutionUnit"].value)
    if unit == 2:  # inch
        return 25400.0 / pixels_per_unit
    if unit == 3:  # centimetre
        return 10000.0 / pixels_per_unit
    return None  # no absolute unit


class _Level:
    """One pyramid level as a TIFF page, read tile by tile (or decoded whole if untiled)."""

    def __init__(self, page, axes: str):
        self.page = page
        self.axes = axes
        shape = dict(zip(axes, page.shape))
        self.height, self.width = int(shape["Y"]), int(shape["X"])
        self.tiled = bool(page.is_tiled) and page.planarconfig == 1
        self.tile = (int(page.tilelength), int(page.tilewidth)) if self.tiled else (256, 256)
        self._whole: np.ndarray | None = None


class TiffBackend:
    name = "tifffile"

    def __init__(self, path: Path):
        self._tf = None
        try:
            self._open(path)
        except Exception as exc:  # a damaged header trips tifffile and numpy in many ways
            if self._tf is not None:
                self._tf.close()
            if isinstance(exc, SlideOpenError):
                raise
            raise SlideOpenError(f"tifffile: {type(exc).__name__}: {exc}") from None

    def _open(self, path: Path) -> None:
        import tifffile

        try:
            self._tf = tifffile.TiffFile(str(path))
            series = self._tf.series[0]
            levels = series.levels
            axes = series.axes
        except Exception as exc:
            raise SlideOpenError(f"tifffile: {exc}") from None
        # keep the planes of one image: the first index of any axis that is not Y, X or samples
        plane_axes = axes.replace("Y", "").replace("X", "").replace("S", "")
        if plane_axes and plane_axes not in ("C",):
            raise SlideOpenError(f"tifffile: unsupported image axes {axes!r} (expected YX, YXS or CYX)")
        self._lock = threading.Lock()
        self._levels = []
        for level in levels:
            page = level.keyframe if hasattr(level, "keyframe") else level.pages[0]
            self._levels.append(_Level(page, level.axes))
        if any(lv.width < 1 or lv.height < 1 for lv in self._levels):
            raise SlideOpenError("tifffile: a pyramid level has no pixels")
        self._series_levels = levels
        self._series_axes = axes
        self.level_dimensions = [(lv.width, lv.height) for lv in self._levels]
        w0 = self.level_dimensions[0][0]
        self.level_downsamples = [w0 / lv.width for lv in self._levels]
        self.tile_sizes = [lv.tile for lv in self._levels]
        first = self._tf.pages[0]
        self.properties = {"tifffile.axes": axes, "tifffile.is_ome": str(self._tf.is_ome)}
        for tag in first.tags.values():
            if tag.name in ("ImageDescription", "Software", "DateTime", "Make", "Model"):
                self.properties[f"tiff.{tag.name}"] = str(tag.value)[:2000]
        self.recorded_mpp = _mpp_from_ome(self._tf) or _mpp_from_resolution(first)
        self.objective_power = None
        try:  # truncated files often fail only when the last tiles are decoded
            for i, (w, h) in enumerate(self.level_dimensions):
                ds = self.level_downsamples[i]
                self.read_region((int((w - 1) * ds), int((h - 1) * ds)), i, (1, 1))
        except Exception as exc:
            raise SlideOpenError(f"tifffile cannot decode the image data: {exc}") from None

    # ---- reading --------------------------------------------------------------------
    def _to_rgb(self, arr: np.ndarray, axes: str) -> np.ndarray:
        if "C" in axes:  # planar CYX -> YXC
            arr = np.moveaxis(arr, axes.index("C"), -1)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        arr = arr[..., :3]
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float32)
            hi = float(arr.max()) or 1.0
            arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr)

    def _whole_level(self, level: int) -> np.ndarray:
        lv = self._levels[level]
        if lv._whole is None:
            if lv.height * lv.width * 4 > MAX_UNTILED_BYTES:
                raise SlideReadError(
                    f"untiled TIFF level {level} ({lv.width} x {lv.height} px) is too large to decode in memory")
            with self._lock:
                arr = self._series_levels[level].asarray()
            if arr.ndim > 3:  # several planes: keep the first one
                arr = arr.reshape((-1,) + arr.shape[-3:])[0]
            lv._whole = self._to_rgb(arr, self._series_levels[level].axes[-arr.ndim :])
        return lv._whole

    def read_region(self, location, level, size) -> np.ndarray:
        ds = self.level_downsamples[level]
        lv = self._levels[level]
        x0 = int(round(location[0] / ds))
        y0 = int(round(location[1] / ds))
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)
        # intersection with the level
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + w, lv.width), min(y0 + h, lv.height)
        if ix1 <= ix0 or iy1 <= iy0:
            return out
        if not lv.tiled:
            out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = self._whole_level(level)[iy0:iy1, ix0:ix1]
            return out
        th, tw = lv.tile
        page = lv.page
        across = -(-lv.width // tw)
        fh = self._tf.filehandle
        decode = page.decode
        for ty in range(iy0 // th, (iy1 - 1) // th + 1):
            for tx in range(ix0 // tw, (ix1 - 1) // tw + 1):
                index = ty * across + tx
                offset, count = page.dataoffsets[index], page.databytecounts[index]
                if count:
                    with self._lock:
                        fh.seek(offset)
                        data = fh.read(count)
                    tile, _, _ = decode(data, index, jpegtables=page.jpegtables)
                    tile = self._to_rgb(tile.reshape(tile.shape[-3:]), "YXS")
                else:  # sparse tile: nothing was scanned there
                    tile = np.full((th, tw, 3), 255, np.uint8)
                # paste the overlap of this tile and the requested region
                ty0, tx0 = ty * th, tx * tw
                sy0, sy1 = max(iy0, ty0), min(iy1, ty0 + th)
                sx0, sx1 = max(ix0, tx0), min(ix1, tx0 + tw)
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]
        return out

    def associated_image_names(self) -> list[str]:
        return []

    def read_associated_image(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def close(self) -> None:
        self._tf.close()


def open_backend(path: Path) -> TiffBackend:
    return TiffBackend(path)
