"""Lazy dask pyramids of a slide, one chunk per slide tile, for napari's multiscale layers."""

from __future__ import annotations

import dask.array as da
import numpy as np

from napari_mil.slide.base import Slide


class LevelArray:
    """Array-like view of one pyramid level: ``level[y0:y1, x0:x1]`` reads that region."""

    def __init__(self, slide: Slide, level: int):
        self.slide = slide
        self.level = level
        w, h = slide.level_dimensions[level]
        self.shape = (h, w, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self._downsample = slide.level_downsamples[level]

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        ys, xs, cs = key
        y0, y1, ystep = ys.indices(self.shape[0])
        x0, x1, xstep = xs.indices(self.shape[1])
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), 3), np.uint8)[::ystep, ::xstep, cs]
        ds = self._downsample
        region = self.slide.read_region((int(x0 * ds), int(y0 * ds)), self.level, (x1 - x0, y1 - y0))
        if ystep != 1 or xstep != 1 or cs != slice(None):
            region = region[::ystep, ::xstep, cs]
        return region


def level_chunks(slide: Slide, level: int) -> tuple[int, int, int]:
    """Chunk shape aligned to the slide's tiles at this level (at least 256 px a side)."""
    th, tw = slide.tile_sizes[level]
    # tiny tiles (e.g. 240 px in some Aperio files) are fine; only guard against degenerate ones
    return (max(th, 64), max(tw, 64), 3)


def dask_pyramid(slide: Slide) -> list[da.Array]:
    """One dask array per level, finest first, each chunk one slide tile."""
    levels = []
    for level in range(slide.level_count):
        arr = LevelArray(slide, level)
        levels.append(
            da.from_array(
                arr,
                chunks=level_chunks(slide, level),
                name=f"napari-mil-{slide.path.name}-{level}-{id(slide)}",
                asarray=False,
                fancy=False,
                lock=False,
                inline_array=True,
            )
        )
    return levels
