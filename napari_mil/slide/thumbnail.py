"""Whole-slide overviews read block by block, so that memory stays bounded whatever the level's size."""

from __future__ import annotations

import math

import numpy as np

from napari_mil.slide.base import Slide

BLOCK = 2048  # level pixels a side read at a time (about 16 MiB of RGBA from OpenSlide)


def read_downsampled(slide: Slide, level: int, out_size: tuple[int, int], block: int = BLOCK) -> np.ndarray:
    """The whole of ``level`` box-averaged to ``out_size`` (w, h), as an (h, w, 3) uint8 array.

    The level is read in regions of at most ``block`` pixels a side, each averaged into its
    part of the output: the result equals resizing the whole level at once, which for a
    single-level gigapixel slide would need gigabytes.
    """
    from PIL import Image

    out_w, out_h = int(out_size[0]), int(out_size[1])
    lw, lh = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    fx, fy = lw / out_w, lh / out_h  # level pixels per output pixel
    step_x, step_y = max(1, int(block // max(fx, 1.0))), max(1, int(block // max(fy, 1.0)))
    out = np.empty((out_h, out_w, 3), np.uint8)
    for r0 in range(0, out_h, step_y):
        r1 = min(r0 + step_y, out_h)
        y0, y1 = r0 * fy, r1 * fy
        sy0, sy1 = int(math.floor(y0)), min(int(math.ceil(y1)), lh)
        for c0 in range(0, out_w, step_x):
            c1 = min(c0 + step_x, out_w)
            x0, x1 = c0 * fx, c1 * fx
            sx0, sx1 = int(math.floor(x0)), min(int(math.ceil(x1)), lw)
            region = slide.read_region((int(sx0 * ds), int(sy0 * ds)), level, (sx1 - sx0, sy1 - sy0))
            if fx == fy == 1.0:
                out[r0:r1, c0:c1] = region
                continue
            img = Image.fromarray(region).resize(
                (c1 - c0, r1 - r0), Image.Resampling.BOX, box=(x0 - sx0, y0 - sy0, x1 - sx0, y1 - sy0))
            out[r0:r1, c0:c1] = np.asarray(img)
    return out
