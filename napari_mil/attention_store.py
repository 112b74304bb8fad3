"""Attention files: a model's per-patch attention over one slide, as ``predict`` writes them
and ``export`` reads them.

    <out>/attention/<slide>.h5
        coords     (N, 2) int64, level-0 (x, y) of each patch's top-left corner
        attention  (N,) float32, the model's attention (a softmax over the bag: it sums to 1)
        attrs: model, probability (of the last class), the feature file's grid geometry
               (patch_size_level0, patch_size, overlap, name) and what the writer adds
               (part, fold, checkpoint)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from napari_mil._h5 import plain_attr
from napari_mil.atomic import atomic_path
from napari_mil.errors import NapariMilError
from napari_mil.heatmaps import AttentionMap, grid_geometry

GEOMETRY_KEYS = ("patch_size_level0", "patch_size", "overlap", "name")  # copied from the feature file


class AttentionFileError(NapariMilError):
    """A file that is not an attention file."""


def attention_path(out: str | os.PathLike, slide_id: str) -> Path:
    """Where ``predict`` puts a slide's attention under its output folder."""
    return Path(out) / "attention" / f"{slide_id}.h5"


def save_attention(path: str | os.PathLike, coords: np.ndarray, attention: np.ndarray, attrs: dict | None = None,
                   geometry: dict | None = None) -> Path:
    """Write an attention file atomically. ``geometry`` is the feature file's attrs, of which the
    grid geometry is kept (so exports draw patches at their true size); ``attrs`` are written as
    they are (None values are left out)."""
    import h5py

    path = Path(path)
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    attention = np.asarray(attention, np.float32).reshape(-1)
    if len(coords) != len(attention):
        raise AttentionFileError(f"{len(attention)} attention values for {len(coords)} patches")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        fh.create_dataset("coords", data=coords)
        fh.create_dataset("attention", data=attention)
        for key in GEOMETRY_KEYS:
            if geometry and geometry.get(key) is not None:
                fh.attrs[key] = geometry[key]
        for key, value in (attrs or {}).items():
            if value is not None:
                fh.attrs[key] = value
    return path


def load_attention(path: str | os.PathLike, name: str | None = None) -> tuple[AttentionMap, dict]:
    """The file's map (named ``name``, else after the file) and its attrs. Files without the
    grid geometry take the coordinates' spacing as the patch size."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as fh:
            coords, values = fh["coords"][:], fh["attention"][:]
            attrs = {k: plain_attr(v) for k, v in fh.attrs.items()}
    except (OSError, KeyError) as exc:
        raise AttentionFileError(f"{path}: not an attention file ({exc})") from None
    size0, step = grid_geometry(attrs, coords)
    return AttentionMap(coords, values, size0, step, name=name or path.stem), attrs
