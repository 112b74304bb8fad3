"""Fixtures shared by the core and GUI tests: the real CMU-1 slide, synthetic slides with known
ground truth, a TIFF writer. GUI-only helpers are in gui/conftest.py."""

import os

# torch must be imported before Qt: the reverse order crashes some Linux CI runs.
import torch  # noqa: F401
import numpy as np
import pytest

from napari_mil.paths import CMU1_PATH


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Generated sample slides go to a per-session folder unless a cache is given."""
    if "NAPARI_MIL_CACHE" not in os.environ:
        os.environ["NAPARI_MIL_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def cmu1_path():
    assert CMU1_PATH.exists(), "the CMU-1 small-region slide ships in napari_mil/data"
    return CMU1_PATH


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory):
    """A 40x (0.25 µm/px) pyramidal slide: tumour, a pen stroke and dark debris on the glass."""
    from napari_mil.synthetic import make_synthetic_slide

    folder = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_slide(
        folder / "slide.tif", width=8192, height=6144, mpp=0.25, seed=11,
        tumour_burden=0.2, pen_marks=True, debris=True,
    )


@pytest.fixture(scope="session")
def blank_slide(tmp_path_factory):
    """Glass only: no tissue at all."""
    from napari_mil.synthetic import make_synthetic_slide

    folder = tmp_path_factory.mktemp("blank")
    return make_synthetic_slide(folder / "blank.tif", width=4096, height=3072, mpp=0.25, seed=2,
                                tumour_burden=0.0, tissue_pieces=0)


@pytest.fixture
def write_tiff():
    """``write_tiff(path, image, tile=None, resolution=None, unit=None, **kwargs)``: a small TIFF
    written with tifffile, for slides that OpenSlide or the tifffile backend reads."""
    return _write_tiff


def _write_tiff(path, image, tile=None, resolution=None, unit=None, **kwargs):
    import tifffile

    extra = {}
    if resolution is not None:
        extra = dict(resolution=(resolution, resolution), resolutionunit=unit)
    tifffile.imwrite(path, image, tile=tile, photometric="rgb", **extra, **kwargs)
    return path


@pytest.fixture
def rgb_image():
    rng = np.random.default_rng(0)
    img = np.full((600, 800, 3), 240, np.uint8)
    # an H&E-pink block with pixel noise
    img[100:500, 200:600] = np.clip(np.array([200, 110, 170]) + rng.normal(0, 12, (400, 400, 3)), 0, 255)
    return img
