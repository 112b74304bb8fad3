"""The docks after Slide & tissue, driven through the manifest in a real napari viewer (Xvfb)."""

import pytest
from test_gui import PLUGIN, notifications, wait_for

pytestmark = pytest.mark.gui


@pytest.fixture
def viewer(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_MIL_CACHE", str(tmp_path / "cache"))
    v = make_napari_viewer()
    v.window.resize(1400, 900)
    return v


def dock(viewer, name):
    return viewer.window.add_plugin_dock_widget(PLUGIN, name)[1]


@pytest.fixture
def tiled(viewer, qtbot, synthetic_slide):
    """The synthetic slide opened, its tissue detected and tiled in the Slide & tissue dock."""
    slide_dock = dock(viewer, "Slide & tissue")
    viewer.open(synthetic_slide.path, plugin=PLUGIN)
    wait_for(qtbot, slide_dock, slide_dock.detect())
    wait_for(qtbot, slide_dock, slide_dock.tile())
    return slide_dock


def test_features_extract_then_load_from_the_cache(viewer, qtbot, tiled):
    features = dock(viewer, "Features")
    features.workers.value = 0
    wait_for(qtbot, features, features.extract())
    bag = features.state.features
    grid = tiled.state.grid
    assert bag is not None and len(bag) == len(grid) and features.state.encoder == "hne_stats"
    assert features.progress.value == features.progress.max == len(grid)
    assert "tiles/s" in features.speed.value
    assert features.extract_button.enabled and not features.cancel_button.enabled

    features.state.features = None
    wait_for(qtbot, features, features.extract())
    assert "loaded from the cache" in features.status.value
    assert len(features.state.features) == len(grid)


def test_features_cancel_keeps_the_viewer_running(viewer, qtbot, tiled):
    features = dock(viewer, "Features")
    features.workers.value = 0
    features.batch_size.value = 4
    worker = features.extract()
    features.cancel()
    wait_for(qtbot, features, worker)
    assert features.state.features is None
    assert any("cancel" in m for m in notifications())
    assert features.extract_button.enabled
    wait_for(qtbot, features, features.extract())  # and a new run resumes and finishes
    assert len(features.state.features) == len(tiled.state.grid)


def test_features_say_what_is_missing(viewer):
    features = dock(viewer, "Features")
    assert features.extract() is None
    assert "no slide yet" in features.status.value
