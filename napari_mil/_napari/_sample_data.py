"""napari sample data: the real CMU-1 small-region Aperio slide and a synthetic H&E slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_mil.paths import CMU1_PATH, cache_dir

# The sample synthetic slide: small enough to generate in a few seconds on a laptop.
SYNTHETIC_SAMPLE = dict(width=10240, height=7680, mpp=0.5, seed=7, tumour_burden=0.12, pen_marks=True)


def synthetic_sample_path() -> Path:
    """Generate the sample synthetic slide once (cached by its parameters) and return its path."""
    import hashlib

    from napari_mil.synthetic import make_synthetic_slide

    key = "_".join(f"{k}{v}" for k, v in sorted(SYNTHETIC_SAMPLE.items()))
    path = cache_dir() / "samples" / f"synthetic_{hashlib.sha1(key.encode()).hexdigest()[:10]}.tif"
    if not (path.exists() and path.with_suffix(".json").exists()):
        make_synthetic_slide(path, **SYNTHETIC_SAMPLE)
    return path


def cmu1_small_region():
    from napari_mil._napari._reader import read_slides

    return read_slides(str(CMU1_PATH))


def synthetic_slide():
    """The synthetic slide plus its tumour ground truth as a (hidden) labels layer."""
    from napari_mil._napari._reader import read_slides
    from napari_mil.synthetic import SyntheticSlide

    path = synthetic_sample_path()
    layers = read_slides(str(path))
    info = SyntheticSlide.load(path)
    s = info.mpp * info.mask_downsample
    ds = info.mask_downsample
    layers.append((
        info.tumour_mask().astype(np.uint8),
        {"name": f"{path.stem} tumour ground truth", "scale": (s, s),
         "translate": ((ds - 1) / 2 * info.mpp,) * 2, "opacity": 0.4, "visible": False},
        "labels",
    ))
    return layers


def teaching_demo():
    """File > Open Sample > napari-mil > Teaching demo: starts the demo in the current viewer."""
    import napari
    from qtpy.QtCore import QTimer

    from napari_mil._napari._demo import TeachingDemo

    viewer = napari.current_viewer()
    demo = TeachingDemo(viewer)
    viewer.window._napari_mil_demo = demo  # keep it alive while it runs
    QTimer.singleShot(0, demo.start)
    return []
