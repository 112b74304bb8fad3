"""Where napari-mil keeps files it makes or ships: the user cache and the packaged slide."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
CMU1_PATH = DATA_DIR / "CMU-1-Small-Region.svs"  # the real Aperio slide, freely redistributable


def cache_dir() -> Path:
    """Per-user cache for generated slides, the demo's cohort and features (NAPARI_MIL_CACHE
    overrides it)."""
    env = os.environ.get("NAPARI_MIL_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-mil"))


def default_feature_root() -> Path:
    """Where the docks keep features unless told otherwise."""
    return cache_dir() / "features"
