"""Patch geometry: from the grid through the feature store and attention files, and read from
TRIDENT's and CLAM's files."""

import h5py
import numpy as np
import pytest

from napari_mil.errors import GridError, NapariMilError
from napari_mil.features.store import FeatureBag, feature_path
from napari_mil.geometry import PatchGeometry
from napari_mil.heatmaps import AttentionMap, load_attention, save_attention
from napari_mil.slide import open_slide
from napari_mil.tiling import make_patch_grid
from napari_mil.tissue import TissueMask

TRIDENT_KEYS = ("patch_size", "patch_size_level0", "overlap", "level0_magnification", "target_magnification")


def tissue_block(slide):
    """Tissue on level-0 [1600, 4800) x [1280, 3200)."""
    w, h = slide.dimensions
    mask = np.zeros((h // 32, w // 32), bool)
    mask[1280 // 32 : 3200 // 32, 1600 // 32 : 4800 // 32] = True
    return TissueMask(mask, (32.0, 32.0))


def test_attrs_round_trip_and_what_is_derived():
    full = PatchGeometry(224, 448, 392, overlap=28, level0_mpp=0.25, target_mpp=0.5, level0_magnification=40,
                         target_magnification=20, level=1)
    attrs = full.to_attrs()
    assert all(key in attrs for key in TRIDENT_KEYS) and attrs["patch_level"] == 1
    assert PatchGeometry.from_attrs(attrs, np.zeros((1, 2))) == full
    bare = PatchGeometry(256, 256, 256)
    attrs = bare.to_attrs()
    assert np.isnan(attrs["level0_magnification"]) and np.isnan(attrs["mpp"]) and "patch_level" not in attrs
    assert PatchGeometry.from_attrs(attrs, np.zeros((1, 2))) == bare
    # older napari-mil files: no step_level0 (derived from the overlap), None written as a string
    old = {"patch_size": 256, "patch_size_level0": 512, "overlap": 64, "level0_magnification": 40,
           "target_magnification": "None"}
    geometry = PatchGeometry.from_attrs(old, np.zeros((1, 2)))
    assert (geometry.step_level0, geometry.target_magnification, geometry.level0_magnification) == (384, None, 40)
    with pytest.raises(GridError, match="overlap"):
        PatchGeometry(256, 512, 384, overlap=256)


@pytest.mark.parametrize("target, overlap", [({"magnification": 20}, 64), ({"target_mpp": 0.8}, 16)])
def test_grid_geometry_round_trips_through_the_store(synthetic_slide, tmp_path, target, overlap):
    with open_slide(synthetic_slide.path) as slide:
        grid = make_patch_grid(slide, tissue_block(slide), patch_size=128, overlap=overlap, min_tissue=1.0, **target)
    geometry = grid.geometry
    assert geometry.overlap == overlap and geometry.level0_mpp == pytest.approx(0.25)
    # the coordinates are spaced by the step the geometry records (at 0.8 µm/px: 358.4 px, 359 of them)
    assert set(np.diff(np.unique(grid.coords[:, 0]))) == {geometry.step_level0}
    features = np.random.default_rng(0).normal(size=(len(grid), 4)).astype(np.float32)
    path = FeatureBag(features, grid.coords, {"encoder": "e", "name": "slide"}, geometry=geometry).save(
        feature_path(tmp_path, "e", "slide"))
    back = FeatureBag.load(path)
    assert back.geometry == geometry and back.encoder == "e"
    if "target_mpp" in target:
        assert back.geometry.target_mpp == pytest.approx(0.8) and back.geometry.step_level0 == 359
    with h5py.File(path) as fh:  # where TRIDENT and CLAM users look
        assert all(key in fh["coords"].attrs for key in TRIDENT_KEYS) and fh["coords"].attrs["name"] == "slide"
        assert "patch_size_level0" not in fh.attrs and fh.attrs["encoder"] == "e"
    amap = AttentionMap.from_geometry(back.coords, np.full(len(back), 1 / len(back)), back.geometry)
    row, col, shape = amap.grid_index()
    assert len(set(zip(row.tolist(), col.tolist()))) == len(back)  # one cell per patch


def test_extraction_writes_the_grid_geometry(synthetic_slide, tmp_path):
    from napari_mil.encoders import create_encoder
    from napari_mil.features.extract import extract_features

    with open_slide(synthetic_slide.path) as slide:
        grid = make_patch_grid(slide, tissue_block(slide), patch_size=128, magnification=10, overlap=32, min_tissue=1.0)
    hne = create_encoder("hne_stats", device="cpu")
    result = extract_features(synthetic_slide.path, grid, hne, tmp_path, num_workers=0)
    assert result.bag.geometry == grid.geometry
    assert FeatureBag.load(result.path).geometry == grid.geometry
    assert extract_features(synthetic_slide.path, grid, hne, tmp_path, num_workers=0).bag.geometry == grid.geometry


def test_trident_feature_file(tmp_path):
    coords = np.array([[0, 0], [256, 0], [512, 0], [0, 256]])
    path = tmp_path / "trident.h5"
    with h5py.File(path, "w") as fh:  # TRIDENT: the patching's attrs on coords, nothing else
        fh.create_dataset("features", data=np.ones((4, 16), np.float32))
        c = fh.create_dataset("coords", data=coords)
        c.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                        "target_magnification": 20, "overlap": 128, "name": "case", "savetodir": "out"})
    bag = FeatureBag.load(path)
    assert bag.geometry == PatchGeometry(256, 512, 256, overlap=128, level0_magnification=40, target_magnification=20)
    assert bag.geometry.target_mpp is None and bag.geometry.level is None


def test_clam_files(tmp_path):
    coords = np.array([[1024, 2048], [1536, 2048], [2560, 2048], [1024, 2560]])
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as fh:  # CLAM's h5_files: bare datasets
        fh.create_dataset("features", data=np.ones((4, 16), np.float32))
        fh.create_dataset("coords", data=coords)
    assert FeatureBag.load(path).geometry == PatchGeometry(512, 512, 512)
    single = tmp_path / "single.h5"
    with h5py.File(single, "w") as fh:
        fh.create_dataset("features", data=np.ones((1, 16), np.float32))
        fh.create_dataset("coords", data=coords[:1])
    bag = FeatureBag.load(single)  # the features still load: only the geometry is unknown
    assert len(bag) == 1
    with pytest.raises(GridError, match="single patch"):
        bag.geometry
    # CLAM's patch files: patch_size at patch_level, with that level's downsample
    clam_patches = {"patch_level": 1, "patch_size": 256, "downsample": np.array([4.0, 4.0])}
    assert PatchGeometry.from_attrs(clam_patches, coords) == PatchGeometry(256, 1024, 1024, level=1)


def test_attention_file_keeps_the_geometry(tmp_path):
    geometry = PatchGeometry(224, 448, 336, overlap=56, level0_mpp=0.25, target_mpp=0.5, level=1)
    coords = np.array([[0, 0], [336, 0], [0, 336]])
    amap = AttentionMap.from_geometry(coords, [0.2, 0.5, 0.3], geometry, "student")
    assert (amap.patch_size_level0, amap.step_level0) == (448, 336)
    path = save_attention(tmp_path / "attention" / "s.h5", amap, {"model": "abmil", "fold": None})
    back, attrs = load_attention(path)
    assert back.geometry == geometry and back.name == "s" and attrs["model"] == "abmil" and "fold" not in attrs
    np.testing.assert_allclose(back.values, amap.values, rtol=1e-6)
    np.testing.assert_array_equal(back.coords, coords)
    # a map made from sizes alone keeps them
    plain, _ = load_attention(save_attention(tmp_path / "p.h5", AttentionMap(coords, [0.2, 0.5, 0.3], 448, 336)))
    assert (plain.patch_size_level0, plain.step_level0) == (448, 336)
    with pytest.raises(NapariMilError, match="do not fit the geometry"):
        AttentionMap(coords, [0.2, 0.5, 0.3], 448, 448, geometry=geometry)
