"""Random fields and textures that both kinds of synthetic slide draw with: tissue pieces, pen
strokes, nuclei, and the upsampling of coarse fields to tiles."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

BACKGROUND = np.array([243, 241, 242], np.float32)
PEN_COLOURS = {"blue": np.array([40, 70, 175], np.float32), "green": np.array([40, 140, 70], np.float32)}


def smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-6)


def tissue_field(rng, shape, pieces: int) -> np.ndarray:
    """Boolean tissue mask at mask resolution: a few irregular blobs, well inside the slide."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    wobble = smooth_noise(rng, shape, sigma=max(h, w) / 18)
    mask = np.zeros(shape, bool)
    for i in range(pieces):
        cy = h * rng.uniform(0.3, 0.7) if pieces == 1 else h * rng.uniform(0.25, 0.75)
        cx = w * (i + 0.5) / pieces + rng.uniform(-0.05, 0.05) * w
        ry = h * rng.uniform(0.25, 0.34) if pieces == 1 else h * rng.uniform(0.15, 0.3)
        rx = w * rng.uniform(0.25, 0.34) / pieces * (1 if pieces == 1 else 1.2)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        mask |= (u * u + v * v) < (1.0 + 0.18 * wobble)
    # keep a margin of background around the tissue
    m = max(2, int(0.04 * min(h, w)))
    mask[:m], mask[-m:], mask[:, :m], mask[:, -m:] = False, False, False, False
    return mask


def stroke(shape, rng, width_px: float) -> np.ndarray:
    """A pen stroke: a thick, slightly curved line near one edge of the slide."""
    h, w = shape
    t = np.linspace(0, 1, 200)
    y = h * (0.12 + 0.06 * np.sin(2 * np.pi * t + rng.uniform(0, 6))) if rng.random() < 0.5 else h * (
        0.88 + 0.05 * np.sin(2 * np.pi * t + rng.uniform(0, 6))
    )
    x = w * (0.15 + 0.3 * t)
    mask = np.zeros(shape, bool)
    mask[np.clip(y.astype(int), 0, h - 1), np.clip(x.astype(int), 0, w - 1)] = True
    return ndimage.binary_dilation(mask, iterations=max(1, int(width_px / 2)))


def nuclei_layer(rng, size: int, count: int, radius_px: tuple[float, float], elongation: tuple[float, float]):
    """Alpha layer (size, size) of soft-edged elliptical nuclei, toroidally wrapped."""
    alpha = np.zeros((size, size), np.float32)
    for _ in range(count):
        r = rng.uniform(*radius_px)
        e = rng.uniform(*elongation)
        a, b = r * e, r / math.sqrt(e)
        theta = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(0, size, 2)
        half = int(math.ceil(max(a, b))) + 2
        ys = np.arange(int(cy) - half, int(cy) + half + 1)
        xs = np.arange(int(cx) - half, int(cx) + half + 1)
        dy, dx = np.meshgrid(ys - cy, xs - cx, indexing="ij")
        u = (dx * math.cos(theta) + dy * math.sin(theta)) / a
        v = (-dx * math.sin(theta) + dy * math.cos(theta)) / b
        d = np.sqrt(u * u + v * v)
        blob = np.clip((1.15 - d) * 4.0, 0.0, 1.0) * rng.uniform(0.75, 1.0)
        # chromatin texture: darker rim and speckles
        blob *= 0.85 + 0.15 * np.clip(d, 0, 1)
        iy, ix = np.ix_(ys % size, xs % size)
        alpha[iy, ix] = np.maximum(alpha[iy, ix], blob)
    return alpha


def upsample(field: np.ndarray, y0: int, x0: int, tile: int, ds: int) -> np.ndarray:
    """Bilinear sample of a mask-resolution float field at level-0 pixel centres of a tile
    (separable: interpolate the few field rows along x, then those rows along y)."""
    h, w = field.shape
    ys = np.clip((np.arange(y0, y0 + tile) + 0.5) / ds - 0.5, 0, h - 1)
    xs = np.clip((np.arange(x0, x0 + tile) + 0.5) / ds - 0.5, 0, w - 1)
    iy = ys.astype(int)
    ix = xs.astype(int)
    iy1 = np.minimum(iy + 1, h - 1)
    ix1 = np.minimum(ix + 1, w - 1)
    fy = (ys - iy).astype(np.float32)[:, None]
    fx = (xs - ix).astype(np.float32)
    r0, r1 = iy[0], iy1[-1] + 1
    rows = field[r0:r1]
    along_x = rows[:, ix] * (1 - fx) + rows[:, ix1] * fx  # (few rows, tile)
    return along_x[iy - r0] * (1 - fy) + along_x[iy1 - r0] * fy


def sharpen(alpha: np.ndarray) -> np.ndarray:
    return np.clip((alpha - 0.5) * 3.0 + 0.5, 0.0, 1.0)
