"""A real napari viewer (under Xvfb): reader, sample data, the Slide & tissue dock, bad inputs."""

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def viewer(make_napari_viewer):
    v = make_napari_viewer()
    v.window.resize(1400, 900)
    return v


@pytest.fixture
def dock(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-mil", "Slide & tissue")
    return widget


def test_reader_returns_none_for_other_files():
    from napari_mil._napari._reader import napari_get_reader

    assert napari_get_reader("image.png") is None
    assert napari_get_reader(["a.svs", "b.png"]) is None
    assert napari_get_reader("slide.svs") is not None


def test_open_cmu1_through_the_manifest(viewer, cmu1_path):
    layers = viewer.open(cmu1_path, plugin="napari-mil")
    layer = layers[0]
    assert layer.name == "CMU-1-Small-Region" and layer.rgb
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    meta = layer.metadata["napari_mil"]
    assert meta["mpp"] == pytest.approx(0.499) and meta["magnification"] == 20
    assert set(layer.metadata["associated_images"]) == {"label", "macro", "thumbnail"}
    assert layer.metadata["properties"]["openslide.vendor"] == "aperio"


def test_synthetic_sample_is_a_lazy_multiscale_layer(viewer):
    import dask.array as da

    layers = viewer.open_sample("napari-mil", "synthetic_slide")
    image = layers[0]
    assert image.multiscale and len(image.data) == 3
    assert all(isinstance(level, da.Array) for level in image.data)
    assert tuple(image.scale) == pytest.approx((0.5, 0.5))
    truth = layers[1]
    assert truth.name.endswith("tumour ground truth") and truth.data.any()


def test_detect_edit_and_retile(viewer, dock, qtbot, synthetic_slide, wait_for):
    viewer.open(synthetic_slide.path, plugin="napari-mil")
    wait_for(qtbot, dock, dock.detect())
    mask_layer = viewer.layers[dock.mask_layer_name()]
    assert mask_layer.data.any()
    wait_for(qtbot, dock, dock.tile())
    points = viewer.layers[dock.grid_layer_name()]
    n_before = len(points.data)
    assert n_before == len(dock.state.grid) > 20

    # the user erases the left half of the tissue: tiling must follow the edit
    cut = mask_layer.data.shape[1] // 2
    erased = mask_layer.data.copy()
    erased[:, :cut] = 0
    mask_layer.data = erased
    wait_for(qtbot, dock, dock.tile())
    grid = dock.state.grid
    assert 0 < len(grid) < n_before
    assert (grid.coords[:, 0] >= cut * dock.state.tissue_mask.downsample[1] - grid.patch_size_level0).all()
    assert len(viewer.layers[dock.grid_layer_name()].data) == len(grid)

    # and painting tissue where there was none adds patches there
    painted = erased.copy()
    painted[:10, :10] = 1
    mask_layer.data = painted
    dock.min_tissue.value = 0.2
    wait_for(qtbot, dock, dock.tile())
    assert (dock.state.grid.coords[:, 1] < 10 * 32).any()


def test_grid_layer_overlays_the_slide(viewer, dock, qtbot, synthetic_slide, wait_for):
    viewer.open(synthetic_slide.path, plugin="napari-mil")
    wait_for(qtbot, dock, dock.detect())
    wait_for(qtbot, dock, dock.tile())
    grid = dock.state.grid
    points = viewer.layers[dock.grid_layer_name()]
    # world position of the first patch centre = (level-0 top-left + half a patch) * mpp
    x, y = grid.coords[0]
    half = grid.patch_size_level0 / 2 - 0.5
    np.testing.assert_allclose(points.data[0], [(y + half) * 0.25, (x + half) * 0.25])
    mask_layer = viewer.layers[dock.mask_layer_name()]
    # the mask's extent in world units equals the slide's
    extent = np.asarray(mask_layer.extent.world)
    slide_extent = np.asarray(viewer.layers["slide"].extent.world)
    np.testing.assert_allclose(extent[1] - extent[0], slide_extent[1] - slide_extent[0], rtol=0.01)


def test_screenshot_shows_slide_mask_and_patches(make_napari_viewer, qtbot, synthetic_slide, wait_for):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1400, 900)
    _, dock = viewer.window.add_plugin_dock_widget("napari-mil", "Slide & tissue")
    viewer.open(synthetic_slide.path, plugin="napari-mil")
    wait_for(qtbot, dock, dock.detect())
    wait_for(qtbot, dock, dock.tile())
    viewer.reset_view()
    qtbot.wait(200)
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
    assert shot.std() > 20, "blank canvas"
    r, g, b = shot[..., 0], shot[..., 1], shot[..., 2]
    cyan = (b > 180) & (g > 150) & (r < 120)  # patch outlines
    pinkish = (r > 150) & (r > g + 30)  # H&E tissue
    assert cyan.mean() > 0.002 and pinkish.mean() > 0.02


def test_save_grid(viewer, dock, qtbot, synthetic_slide, tmp_path, wait_for):
    from napari_mil.tiling import PatchGrid

    viewer.open(synthetic_slide.path, plugin="napari-mil")
    assert dock.save_grid(tmp_path / "g.h5") is None  # nothing to save yet: a message, no file
    assert "press 'Tile' first" in dock.status.value
    wait_for(qtbot, dock, dock.detect())
    wait_for(qtbot, dock, dock.tile())
    path = dock.save_grid(tmp_path / "g.h5")
    assert len(PatchGrid.load(path)) == len(dock.state.grid)


# ---- bad inputs: a message, and the viewer keeps running ------------------------------
def test_not_a_slide_via_the_dock(viewer, dock, tmp_path, notifications):
    bad = tmp_path / "notes.svs"
    bad.write_text("not a slide")
    assert dock.open_slide(bad) is None
    assert "notes.svs is not a readable slide" in dock.status.value
    assert len(viewer.layers) == 0
    assert any("not a readable slide" in m for m in notifications())


def test_corrupt_slide_via_file_open(viewer, synthetic_slide, tmp_path):
    from napari.errors import ReaderPluginError

    from napari_mil.errors import SlideOpenError

    data = open(synthetic_slide.path, "rb").read()
    path = tmp_path / "truncated.tif"
    path.write_bytes(data[: len(data) // 2])
    # napari shows this error as a notification when the file comes from File > Open
    with pytest.raises((ReaderPluginError, SlideOpenError)) as info:
        viewer.open(path, plugin="napari-mil")
    assert "truncated.tif is not a readable slide" in str(info.value.__cause__ or info.value)
    viewer.add_image(np.zeros((4, 4)))  # still usable
    assert len(viewer.layers) == 1


def test_unsupported_format_via_the_dock(dock, tmp_path):
    path = tmp_path / "picture.jpg"
    path.write_bytes(b"\xff\xd8\xff" + b"0" * 64)
    dock.open_slide(path)
    assert "unsupported format" in dock.status.value


def test_missing_mpp_is_asked_for_then_used(viewer, dock, qtbot, tmp_path, rgb_image, write_tiff, wait_for):
    path = write_tiff(tmp_path / "nompp.tif", rgb_image, tile=(256, 256))
    layer = dock.open_slide(path)
    assert tuple(layer.scale) == (1.0, 1.0)  # pixels until the user says otherwise
    assert dock.detect() is None
    assert "µm per pixel" in dock.status.value
    with pytest.raises(ValueError):
        dock.mpp.value = 5000.0  # the field itself stops at 20 µm/px
    dock.mpp.value = 0.01  # in the field's range, but no scanner is that fine
    assert "outside the plausible range" in dock.status.value
    assert tuple(layer.scale) == (1.0, 1.0)
    dock.mpp.value = 0.25
    assert tuple(layer.scale) == (0.25, 0.25)
    dock.preset.value = "biopsy"
    wait_for(qtbot, dock, dock.detect())
    assert viewer.layers[dock.mask_layer_name()].data.any()


def test_no_tissue(viewer, dock, qtbot, blank_slide, wait_for):
    viewer.open(blank_slide.path, plugin="napari-mil")
    wait_for(qtbot, dock, dock.detect())
    assert "no tissue found" in dock.status.value
    wait_for(qtbot, dock, dock.tile())
    assert "no tissue" in dock.status.value
    assert dock.grid_layer_name() not in viewer.layers


def test_patch_larger_than_slide_and_magnification_above_scan(viewer, dock, qtbot, cmu1_path, wait_for):
    viewer.open(cmu1_path, plugin="napari-mil")
    wait_for(qtbot, dock, dock.detect())
    dock.patch_size.value = 4096
    wait_for(qtbot, dock, dock.tile())
    assert "more than the slide" in dock.status.value
    dock.patch_size.value = 256
    dock.magnification.value = 40.0  # CMU-1 was scanned at 20x
    wait_for(qtbot, dock, dock.tile())
    assert "finer than the scan" in dock.status.value
    dock.magnification.value = 20.0
    wait_for(qtbot, dock, dock.tile())
    assert dock.grid_layer_name() in viewer.layers


def test_steps_out_of_order_say_what_is_missing(dock):
    assert dock.detect() is None and "open one first" in dock.status.value
    assert dock.tile() is None and "open one first" in dock.status.value


@pytest.mark.slow
def test_teaching_demo_finds_the_lesion(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """The README's main job from a fresh cache: the semi-real cohort and held-out slide are
    written, the Retrain dock trains a baseline then MHIM-MIL, and the teacher's and the student's
    attention both find the held-out slide's lesion, in the figures and in the screenshot."""
    from scipy import ndimage

    from napari_mil._napari._demo import TeachingDemo

    monkeypatch.setenv("NAPARI_MIL_CACHE", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1600, 1000)
    demo = TeachingDemo(viewer, snapshots=tmp_path / "out")
    demo.start()
    qtbot.waitUntil(lambda: demo.done, timeout=600_000)
    assert demo.error is None, demo.error
    summary = demo.write(tmp_path / "out")
    held_out = summary["held_out"]
    assert held_out["lesion_patches"] > 5
    for part in ("teacher", "student"):
        assert held_out[part]["positive"] and held_out[part]["localisation_auc"] > 0.9, held_out
    assert [r["phase"] for r in summary["history"]][:2] == ["baseline", "baseline"]
    assert summary["history"][-1]["phase"] == "train" and summary["history"][-1]["masked"] > 0.2
    assert summary["test_auc"] is not None  # the cohort's split holds test slides out
    assert {"first_picture.png", "teacher_student.png", "retrain_curves.png"} <= set(summary["files"])
    assert summary["timings_s"]["tiled_s"] < summary["timings_s"]["total_s"]
    # the screenshot: the lesion's green outline, and the hottest attention colours beside it
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
    r, g, b = shot[..., 0], shot[..., 1], shot[..., 2]
    outline = (g > 200) & (r < 120) & (b < 100)
    hot = (r > 180) & (g > 90) & (b < 110) & ~outline  # inferno's orange to yellow
    assert outline.mean() > 2e-4 and hot.sum() > 30
    assert (hot & ndimage.binary_dilation(outline, iterations=12)).sum() > 0.4 * hot.sum()
