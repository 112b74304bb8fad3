"""Lazy dask pyramids of a slide, one chunk per slide tile, for napari's multiscale layers."""

from __future__ import annotations

from typing import Callable

import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph

from napari_mil.errors import SlideReadError
from napari_mil.slide.base import Slide

BLANK = 255  # what an unreadable tile shows: white, like unscanned glass


def read_chunk(slide: Slide, location: tuple[int, int], level: int, size: tuple[int, int],
               on_error: Callable[[SlideReadError], None] | None) -> np.ndarray:
    """One chunk: the slide's region, or, when ``on_error`` is given and the region cannot be
    read, a blank tile after passing the SlideReadError to ``on_error``."""
    if on_error is None:
        return slide.read_region(location, level, size)
    try:
        return slide.read_region(location, level, size)
    except SlideReadError as exc:
        on_error(exc)
        return np.full((int(size[1]), int(size[0]), 3), BLANK, np.uint8)


def level_chunks(slide: Slide, level: int) -> tuple[int, int, int]:
    """Chunk shape: the slide's tile at this level (at least 64 px a side).

    Aperio's 240 px tiles are fine; the floor only guards against degenerate tile sizes.
    """
    th, tw = slide.tile_sizes[level]
    return (max(th, 64), max(tw, 64), 3)


def dask_pyramid(slide: Slide, on_error: Callable[[SlideReadError], None] | None = None) -> list[da.Array]:
    """One dask array per level, finest first, each chunk one slide tile.

    Without ``on_error`` an unreadable tile raises SlideReadError when computed; with it, the
    tile is blank and ``on_error`` gets the error (the viewer shows a notification, not a dead layer).

    Each level is a plain task graph with one ``read_region`` task per tile. That is the
    cheapest form for dask to slice and schedule: per napari viewport read it costs about half
    the overhead of ``map_blocks`` (whose blockwise layer is rebuilt for the whole level at each
    compute) and a third of ``from_array`` (which adds getter and slicing tasks per chunk);
    benchmarks/bench_slide_to_tiles.py measures the result against raw OpenSlide reads.
    """
    levels = []
    for level in range(slide.level_count):
        w, h = slide.level_dimensions[level]
        th, tw, _ = level_chunks(slide, level)
        chunks = (_split(h, th), _split(w, tw), (3,))
        ds = slide.level_downsamples[level]
        name = f"napari-mil-{slide.path.name}-{level}-{id(slide):x}"
        ys = np.cumsum((0,) + chunks[0])
        xs = np.cumsum((0,) + chunks[1])
        graph = {
            (name, i, j, 0): (
                read_chunk, slide, (int(xs[j] * ds), int(ys[i] * ds)), level,
                (int(xs[j + 1] - xs[j]), int(ys[i + 1] - ys[i])), on_error,
            )
            for i in range(len(chunks[0]))
            for j in range(len(chunks[1]))
        }
        hlg = HighLevelGraph.from_collections(name, graph, dependencies=())
        levels.append(da.Array(hlg, name, chunks, dtype=np.uint8, meta=np.empty((0, 0, 3), np.uint8)))
    return levels


def _split(length: int, step: int) -> tuple[int, ...]:
    full, rest = divmod(length, step)
    return (step,) * full + ((rest,) if rest else ())
