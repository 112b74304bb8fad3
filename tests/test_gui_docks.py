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


@pytest.fixture
def with_features(viewer, qtbot, tiled):
    features = dock(viewer, "Features")
    features.workers.value = 0
    wait_for(qtbot, features, features.extract())
    return features.state


def test_model_loads_checkpoints_and_shows_the_map(viewer, qtbot, with_features, tmp_path):
    import numpy as np
    import torch

    from napari_mil.models import create_model
    from napari_mil.training.trainer import save_checkpoint

    state = with_features
    torch.manual_seed(0)
    model = create_model("abmil_gated", 38)
    save_checkpoint(tmp_path / "ours", model, {"model": "abmil_gated", "model_cfg": {}, "in_dim": 38, "n_classes": 2,
                                               "threshold": 0.4})
    model_dock = dock(viewer, "Model")
    wait_for(qtbot, model_dock, model_dock.load(tmp_path / "ours.json"))
    assert model_dock.model_name.value == "abmil_gated" and state.teacher is None
    wait_for(qtbot, model_dock, model_dock.infer())
    layer = viewer.layers[f"{state.slide.name} attention"]
    amap = state.attention
    with torch.no_grad():
        expected = model(torch.from_numpy(np.asarray(state.features.features, np.float32))[None])
    assert np.allclose(amap.values, expected.attention[0].numpy(), atol=1e-6)
    assert np.nansum(np.isfinite(layer.data)) == len(state.features)
    p = torch.softmax(expected.logits, 1)[0, 1].item()
    assert f"{p:.3f}" in model_dock.prediction.value and "threshold 0.40" in model_dock.prediction.value

    # an MHIM-MIL file of the official code: the student predicts, the teacher comes along
    from test_interop import OfficialMHIM, _randomise

    student, teacher = _randomise(OfficialMHIM("v1", "attn", in_dim=38), 1), _randomise(OfficialMHIM("v1", "attn", in_dim=38), 2)
    torch.save({"model": student.state_dict(), "teacher": teacher.state_dict()}, tmp_path / "fold_0_model_best.pt")
    wait_for(qtbot, model_dock, model_dock.load(tmp_path / "fold_0_model_best.pt"))
    assert state.teacher is not None and "MHIM-MIL v1" in model_dock.status.value and "teacher" in model_dock.status.value
    wait_for(qtbot, model_dock, model_dock.infer())
    logits, attention = student(torch.from_numpy(np.asarray(state.features.features, np.float32))[None])
    assert np.allclose(state.attention.values, attention[0].detach().numpy(), atol=1e-5)


def test_model_refuses_what_does_not_fit(viewer, qtbot, with_features, tmp_path):
    from napari_mil.models import create_model
    from napari_mil.training.trainer import save_checkpoint

    model_dock = dock(viewer, "Model")
    assert model_dock.infer() is None and "no model yet" in model_dock.status.value
    save_checkpoint(tmp_path / "wide", create_model("abmil", 1024), {"model": "abmil", "model_cfg": {}, "in_dim": 1024,
                                                                     "n_classes": 2})
    wait_for(qtbot, model_dock, model_dock.load(tmp_path / "wide"))
    assert "expects 1024-d features" in model_dock.status.value and model_dock.state.model is None
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    wait_for(qtbot, model_dock, model_dock.load(tmp_path / "junk.pt"))
    assert "not a readable PyTorch checkpoint" in model_dock.status.value
    assert any("expects 1024-d" in m for m in notifications())
    assert viewer.layers  # the viewer goes on
