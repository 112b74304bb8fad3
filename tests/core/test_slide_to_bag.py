"""The slide-to-bag use case: one set of grid settings, tiling with its files, grid reuse, features."""

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from napari_mil.errors import ExtractionCancelled, NapariMilError
from napari_mil.tissue import PRESETS
from napari_mil.usecases.slide_to_bag import (
    GridSettings,
    expand_inputs,
    slide_grid,
    slide_to_bag,
    tile_slide,
)

NAME = "CMU-1-Small-Region"


@pytest.fixture(scope="module")
def hne():
    from napari_mil.encoders import create_encoder

    return create_encoder("hne_stats", device="cpu")


def test_tile_slide_writes_mask_grid_and_preview(cmu1_path, tmp_path):
    result = tile_slide(cmu1_path, tmp_path, GridSettings())
    assert result.slide == NAME
    assert result.mask == tmp_path / "masks" / f"{NAME}.png" and result.mask.exists()
    assert result.grid == tmp_path / "patches" / f"{NAME}.h5"
    assert result.preview == tmp_path / "previews" / f"{NAME}.png" and result.preview.exists()
    with h5py.File(result.grid) as fh:
        assert fh["coords"].shape[0] == result.patches > 10
        assert fh["coords"].attrs["patch_size_level0"] == 256
    assert 0 < result.tissue_fraction < 1
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # atomic writes leave nothing behind


def test_a_second_call_reuses_the_grid(cmu1_path, tmp_path):
    first = slide_grid(cmu1_path, tmp_path, GridSettings(patch_size=128))
    assert first.tiled and len(first.grid) > 10 and first.mpp == pytest.approx(0.499, abs=1e-3)
    grid_file = tmp_path / "patches" / f"{NAME}.h5"
    written = grid_file.stat().st_mtime_ns
    again = slide_grid(cmu1_path, tmp_path, GridSettings(patch_size=128))
    assert not again.tiled and grid_file.stat().st_mtime_ns == written
    np.testing.assert_array_equal(again.grid.coords, first.grid.coords)
    # without settings the grid on disk is the slide's grid, whatever made it (the viewer's edited grid)
    assert len(slide_grid(cmu1_path, tmp_path).grid) == len(first.grid)


def test_settings_reach_the_detector_and_the_grid(cmu1_path, tmp_path):
    settings = GridSettings(target_mpp=1.0, patch_size=64, overlap=16, preset="biopsy", saturation_threshold=20,
                            min_tissue_area_um2=1e4)
    params = settings.tissue_params()
    assert params.saturation_threshold == 20 and params.min_tissue_area_um2 == 1e4
    assert params.close_um == PRESETS["biopsy"].close_um
    assert settings.grid_options() == dict(patch_size=64, target_mpp=1.0, magnification=None, overlap=16,
                                           min_tissue=0.5)
    assert GridSettings().tissue_params() == PRESETS["resection"]
    tile_slide(cmu1_path, tmp_path, settings)
    with h5py.File(tmp_path / "patches" / f"{NAME}.h5") as fh:
        assert fh["coords"].attrs["mpp"] == pytest.approx(1.0)
        assert fh["coords"].attrs["patch_size"] == 64


@pytest.mark.parametrize("options, message", [
    ({"overlap": -1}, "overlap must be in"),
    ({"overlap": 256}, "overlap must be in"),
    ({"patch_size": 0}, "too small"),
    ({"patch_size": 256.5}, "whole number"),
    ({"min_tissue": 1.5}, "within 0-1"),
    ({"min_tissue": float("nan")}, "within 0-1"),
    ({"magnification": 0}, "magnification must be positive"),
    ({"target_mpp": -0.5}, "target mpp must be positive"),
    ({"magnification": "x"}, "must be a number"),
    ({"preset": "needle"}, "unknown tissue preset"),
    ({"saturation_threshold": 300}, "0-255"),
    ({"min_tissue_area_um2": -1.0}, "0 or more"),
    ({"mpp": 5000.0}, "outside the plausible range"),
])
def test_nonsense_settings_are_refused_clearly(options, message):
    with pytest.raises(NapariMilError, match=message):
        GridSettings(**options)


def test_the_slides_mpp_comes_before_the_settings(tmp_path, rgb_image, write_tiff):
    path = write_tiff(tmp_path / "nompp.tif", rgb_image, tile=(256, 256))
    with pytest.raises(NapariMilError, match="mpp"):
        tile_slide(path, tmp_path / "a", GridSettings(patch_size=64, preset="biopsy"))
    assert tile_slide(path, tmp_path / "b", GridSettings(patch_size=64, preset="biopsy"), mpp=0.25).patches > 0
    assert slide_grid(path, tmp_path / "c", GridSettings(patch_size=64, preset="biopsy", mpp=0.5)).mpp == 0.5


def test_expand_inputs_reads_folders_and_csvs(cmu1_path, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(cmu1_path, folder / "a.svs")
    (folder / "notes.txt").write_text("not a slide")
    assert expand_inputs([str(folder)]) == [(folder / "a.svs", None)]
    table = tmp_path / "slides.csv"
    table.write_text("path,mpp\nslides/a.svs,0.5\n/abs/b.tif,\n")
    assert expand_inputs([str(table)]) == [(folder / "a.svs", 0.5), (Path("/abs/b.tif"), None)]
    (tmp_path / "bad.csv").write_text("slide_id,label\nx,1\n")
    with pytest.raises(NapariMilError, match="no 'path' column"):
        expand_inputs([str(tmp_path / "bad.csv")])


def test_slide_to_bag_tiles_extracts_and_caches(cmu1_path, tmp_path, hne):
    reports = []
    result = slide_to_bag(cmu1_path, hne, tmp_path, GridSettings(), num_workers=0, progress=reports.append)
    with h5py.File(tmp_path / "patches" / f"{NAME}.h5") as fh:
        assert len(result.bag) == fh["coords"].shape[0]
    assert result.bag.dim == hne.dim and not result.cached
    assert result.path.parent.name == "features_hne_stats" and reports and reports[-1].done == len(result.bag)
    again = slide_to_bag(cmu1_path, hne, tmp_path, GridSettings(), num_workers=0)
    assert again.cached and len(again.bag) == len(result.bag)
    with pytest.raises(ExtractionCancelled):
        slide_to_bag(cmu1_path, hne, tmp_path / "other", GridSettings(), num_workers=0, cancel=lambda: True)
    assert not (tmp_path / "other").exists()


def test_cohort_features_use_the_grid_settings(tmp_path, hne):
    from napari_mil.features.store import FeatureBag, feature_path
    from napari_mil.synthetic import make_cohort
    from napari_mil.usecases.cohort import ensure_features, read_cohort

    slides = read_cohort(make_cohort(tmp_path / "cohort", n_slides=2, width=2048, height=1536, mpp=0.5))
    reports = []
    bags = ensure_features(slides, hne, tmp_path / "features", GridSettings(patch_size=128),
                           progress=reports.append)
    assert [r.extracted for r in reports] == [True, True] and reports[-1].done == reports[-1].total == 2
    assert [b.slide_id for b in bags] == [s.record.slide_id for s in slides]
    for item in slides:
        stored = FeatureBag.load(feature_path(tmp_path / "features", hne.name, item.record.slide_id))
        assert stored.attrs["patch_size"] == 128
    reports.clear()
    ensure_features(slides, hne, tmp_path / "features", GridSettings(patch_size=128), progress=reports.append)
    assert [r.extracted for r in reports] == [False, False]  # the same settings: the cached features
    reports.clear()
    ensure_features(slides, hne, tmp_path / "features", progress=reports.append)  # 256 px patches now
    assert [r.extracted for r in reports] == [True, True]  # features of other settings are never reused
    for item in slides:
        stored = FeatureBag.load(feature_path(tmp_path / "features", hne.name, item.record.slide_id))
        assert stored.attrs["patch_size"] == 256
