"""Patch-grid geometry on slides whose tissue is known, the HDF5 layout, and bad parameters."""

import h5py
import numpy as np
import pytest

from napari_mil.errors import GridError, NoTissueError
from napari_mil.slide import open_slide
from napari_mil.tiling import PatchGrid, make_patch_grid, read_patch, tissue_fractions
from napari_mil.tissue import TissueMask, detect_tissue

MASK_DS = 32.0  # level-0 pixels per mask pixel in these tests


@pytest.fixture
def slide(synthetic_slide):
    with open_slide(synthetic_slide.path) as s:
        yield s


def rectangle_mask(slide, x0, y0, x1, y1):
    """Tissue exactly on level-0 [x0, x1) x [y0, y1) (multiples of MASK_DS)."""
    w, h = slide.dimensions
    mask = np.zeros((int(h / MASK_DS), int(w / MASK_DS)), bool)
    mask[int(y0 / MASK_DS) : int(y1 / MASK_DS), int(x0 / MASK_DS) : int(x1 / MASK_DS)] = True
    return TissueMask(mask, (MASK_DS, MASK_DS))


def test_full_patches_inside_a_known_rectangle(slide):
    mask = rectangle_mask(slide, 1600, 1280, 4800, 3200)
    grid = make_patch_grid(slide, mask, patch_size=256, magnification=20, min_tissue=1.0)
    assert grid.level == 0 and grid.patch_size_level0 == 512 and grid.patch_size_level == 512
    assert grid.target_mpp == pytest.approx(0.5) and grid.target_magnification == pytest.approx(20)
    xs, ys = [2048, 2560, 3072, 3584, 4096], [1536, 2048, 2560]
    expected = sorted((x, y) for x in xs for y in ys)
    assert sorted(map(tuple, grid.coords.tolist())) == expected
    assert np.all(grid.tissue_fraction == pytest.approx(1.0))


def test_tissue_fraction_is_exact_for_partial_patches(slide):
    mask = rectangle_mask(slide, 1600, 1280, 4800, 3200)
    coords = np.array([[1536, 1024], [1536, 1536], [4096, 3072], [0, 0]])
    fractions = tissue_fractions(mask, coords, 512)
    expected = [(2048 - 1600) / 512 * (1536 - 1280) / 512, (2048 - 1600) / 512, (3200 - 3072) / 512, 0.0]
    np.testing.assert_allclose(fractions, expected, atol=1e-6)
    kept = make_patch_grid(slide, mask, magnification=20, min_tissue=0.4)
    assert [1536, 1024] in kept.coords.tolist()
    assert [1536, 1024] not in make_patch_grid(slide, mask, magnification=20, min_tissue=0.5).coords.tolist()
    any_tissue = make_patch_grid(slide, mask, magnification=20, min_tissue=0.0)
    assert (any_tissue.tissue_fraction > 0).all() and len(any_tissue) > len(kept)


def test_overlap_shortens_the_step(slide):
    mask = rectangle_mask(slide, 1600, 1280, 4800, 3200)
    grid = make_patch_grid(slide, mask, patch_size=256, magnification=20, overlap=64, min_tissue=1.0)
    xs = np.unique(grid.coords[:, 0])
    assert set(np.diff(xs)) == {384}  # (256 - 64) px at 20x = 384 level-0 px
    assert grid.step_level0 == 384 and grid.attrs()["overlap"] == 64


@pytest.mark.parametrize("magnification, size, level, size_level", [(10, 256, 1, 256), (5, 256, 1, 512), (2.5, 64, 2, 64)])
def test_coordinates_are_level0_at_every_level(slide, magnification, size, level, size_level):
    """A patch read at a coarse level shows the same tissue as level 0 at its coordinates."""
    from PIL import Image

    grid = make_patch_grid(slide, detect_tissue(slide), patch_size=size, magnification=magnification, min_tissue=0.2)
    assert grid.level == level and grid.patch_size_level == size_level
    ds0 = 40 / magnification
    assert grid.patch_size_level0 == size * ds0
    for i in range(0, len(grid), max(1, len(grid) // 4)):
        patch = read_patch(slide, grid, i).astype(float)
        x, y = grid.coords[i]
        ref = slide.read_region((int(x), int(y)), 0, (grid.patch_size_level0,) * 2)
        ref = np.asarray(Image.fromarray(ref).resize((size, size), Image.Resampling.BOX)).astype(float)
        assert np.abs(patch - ref).mean() < 6.0
        shifted = slide.read_region((int(x) + grid.patch_size_level0 // 2, int(y)), 0, (grid.patch_size_level0,) * 2)
        shifted = np.asarray(Image.fromarray(shifted).resize((size, size), Image.Resampling.BOX)).astype(float)
        assert np.abs(patch - ref).mean() < np.abs(patch - shifted).mean()


@pytest.mark.parametrize("target_mpp, level, size_level, size0", [(0.6, 0, 614, 614), (1.2, 1, 307, 1229)])
def test_mpp_targets_resample_from_the_best_level(slide, target_mpp, level, size_level, size0):
    grid = make_patch_grid(slide, detect_tissue(slide), patch_size=256, target_mpp=target_mpp)
    assert (grid.level, grid.patch_size_level, grid.patch_size_level0) == (level, size_level, size0)
    assert grid.target_mpp == pytest.approx(target_mpp)
    assert read_patch(slide, grid, 0).shape == (256, 256, 3)


def test_patches_sit_on_ground_truth_tissue(slide, synthetic_slide):
    grid = make_patch_grid(slide, detect_tissue(slide), magnification=20, min_tissue=0.5)
    truth = TissueMask(synthetic_slide.tissue_mask(), (synthetic_slide.mask_downsample,) * 2)
    true_fraction = tissue_fractions(truth, grid.coords, grid.patch_size_level0)
    assert len(grid) > 30
    assert (true_fraction >= 0.4).mean() > 0.97
    w, h = slide.dimensions
    assert (grid.coords >= 0).all()
    assert (grid.coords[:, 0] + grid.patch_size_level0 <= w).all() and (grid.coords[:, 1] + grid.patch_size_level0 <= h).all()


def test_real_cmu1_slide_tiles(cmu1_path):
    with open_slide(cmu1_path) as slide:
        grid = make_patch_grid(slide, detect_tissue(slide), patch_size=256, magnification=20)
        assert grid.level == 0 and grid.patch_size_level0 == 256
        assert 15 <= len(grid) <= 60
        assert (grid.tissue_fraction >= 0.5).all()
        patch = read_patch(slide, grid, 0)
        assert patch.shape == (256, 256, 3) and patch.std() > 10


def test_patch_larger_than_the_slide(slide):
    with pytest.raises(GridError, match="more than the slide"):
        make_patch_grid(slide, detect_tissue(slide), patch_size=4096, magnification=5)


def test_magnification_above_the_scan(slide):
    with pytest.raises(GridError, match="finer than the scan"):
        make_patch_grid(slide, detect_tissue(slide), magnification=80)
    with pytest.raises(GridError, match="finer than the scan"):
        make_patch_grid(slide, detect_tissue(slide), target_mpp=0.1)


@pytest.mark.parametrize("kwargs", [dict(overlap=256), dict(overlap=-1), dict(min_tissue=1.5), dict(patch_size=4)])
def test_bad_grid_parameters(slide, kwargs):
    with pytest.raises(GridError):
        make_patch_grid(slide, detect_tissue(slide), **kwargs)


def test_no_tissue_nothing_to_tile(slide):
    empty = TissueMask(np.zeros((10, 10), bool), (819.2, 614.4))
    with pytest.raises(NoTissueError):
        make_patch_grid(slide, empty)


def test_grid_round_trip_with_trident_and_clam_attrs(slide, tmp_path):
    grid = make_patch_grid(slide, detect_tissue(slide), magnification=10, overlap=32)
    path = grid.save(tmp_path / "patches" / "slide.h5")
    with h5py.File(path) as fh:
        attrs = dict(fh["coords"].attrs)
        assert fh["coords"].shape == (len(grid), 2)
    for key in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap", "name"):
        assert key in attrs  # TRIDENT
    for key in ("patch_level", "downsample", "downsampled_level_dim", "level_dim"):
        assert key in attrs  # CLAM
    back = PatchGrid.load(path)
    np.testing.assert_array_equal(back.coords, grid.coords)
    np.testing.assert_allclose(back.tissue_fraction, grid.tissue_fraction)
    for field in ("patch_size", "patch_size_level0", "level", "patch_size_level", "overlap", "slide_name"):
        assert getattr(back, field) == getattr(grid, field)
    assert back.target_mpp == pytest.approx(1.0) and back.level0_magnification == pytest.approx(40)


def test_reads_a_trident_coords_file(tmp_path):
    path = tmp_path / "case_patches.h5"
    with h5py.File(path, "w") as fh:
        ds = fh.create_dataset("coords", data=np.array([[0, 0], [512, 0], [0, 512]]))
        ds.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                         "target_magnification": 20, "overlap": 0, "name": "case", "savetodir": "x"})
    grid = PatchGrid.load(path)
    assert grid.patch_size_level0 == 512 and grid.target_magnification == 20 and grid.slide_name == "case"
    assert len(grid) == 3


def test_reads_a_clam_coords_file(tmp_path, slide):
    path = tmp_path / "case.h5"
    with h5py.File(path, "w") as fh:
        ds = fh.create_dataset("coords", data=np.array([[0, 0], [1024, 0]]))
        ds.attrs.update({"patch_level": 1, "patch_size": 256, "downsample": np.array([4.0, 4.0]),
                         "downsampled_level_dim": np.array([2048, 1536]), "level_dim": np.array([8192, 6144]),
                         "name": "case", "save_path": "x"})
    grid = PatchGrid.load(path, slide=slide)
    assert (grid.level, grid.patch_size_level, grid.patch_size_level0) == (1, 256, 1024)
    assert grid.target_mpp == pytest.approx(1.0) and grid.target_magnification == pytest.approx(10)


def test_not_a_coords_file(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("features", data=np.zeros((2, 3)))
    with pytest.raises(GridError, match="no 'coords'"):
        PatchGrid.load(path)


def test_interrupted_save_leaves_the_old_grid_and_no_partial_file(slide, tmp_path, monkeypatch):
    grid = make_patch_grid(slide, detect_tissue(slide), magnification=20)
    path = grid.save(tmp_path / "slide.h5")
    before = path.read_bytes()
    original = h5py.Group.create_dataset

    def fail_midway(self, name, *args, **kwargs):
        if name == "tissue_fraction":
            raise OSError("No space left on device")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_midway)
    smaller = make_patch_grid(slide, detect_tissue(slide), magnification=10)
    with pytest.raises(OSError, match="No space"):
        smaller.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["slide.h5"]
