"""The docks after Slide & tissue, driven through the manifest in a real napari viewer (Xvfb)."""

import pytest

pytestmark = pytest.mark.gui


@pytest.fixture
def viewer(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_MIL_CACHE", str(tmp_path / "cache"))
    v = make_napari_viewer(show=True)  # shown: the comparison's screenshot needs a real canvas size
    v.window.resize(1400, 900)
    return v


def dock(viewer, name):
    return viewer.window.add_plugin_dock_widget("napari-mil", name)[1]


@pytest.fixture
def tiled(viewer, qtbot, synthetic_slide, wait_for):
    """The synthetic slide opened, its tissue detected and tiled in the Slide & tissue dock."""
    slide_dock = dock(viewer, "Slide & tissue")
    viewer.open(synthetic_slide.path, plugin="napari-mil")
    wait_for(qtbot, slide_dock, slide_dock.detect())
    wait_for(qtbot, slide_dock, slide_dock.tile())
    return slide_dock


def test_features_extract_then_load_from_the_cache(viewer, qtbot, tiled, wait_for):
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


def test_features_cancel_keeps_the_viewer_running(viewer, qtbot, tiled, wait_for, notifications):
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
def with_features(viewer, qtbot, tiled, wait_for):
    features = dock(viewer, "Features")
    features.workers.value = 0
    wait_for(qtbot, features, features.extract())
    return features.state


def test_model_loads_checkpoints_and_shows_the_map(viewer, qtbot, with_features, tmp_path, wait_for):
    import numpy as np
    import torch

    from napari_mil.models import create_model
    from napari_mil.training.checkpoints import save_checkpoint

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
    model.eval()  # as the dock predicts: no dropout
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
    _, attention = student(torch.from_numpy(np.asarray(state.features.features, np.float32))[None])
    assert np.allclose(state.attention.values, attention[0].detach().numpy(), atol=1e-5)


def test_model_refuses_what_does_not_fit(viewer, qtbot, with_features, tmp_path, wait_for, notifications):
    from napari_mil.models import create_model
    from napari_mil.training.checkpoints import save_checkpoint

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


@pytest.fixture
def mhim_pair(viewer, qtbot, with_features, tmp_path, wait_for):
    """An MHIM-MIL checkpoint of the official layout (38-d) loaded in the Model dock."""
    import torch
    from test_interop import OfficialMHIM, _randomise

    student, teacher = _randomise(OfficialMHIM("v1", "attn", in_dim=38), 1), _randomise(OfficialMHIM("v1", "attn", in_dim=38), 2)
    torch.save({"model": student.state_dict(), "teacher": teacher.state_dict()}, tmp_path / "fold_0_model_best.pt")
    model_dock = dock(viewer, "Model")
    wait_for(qtbot, model_dock, model_dock.load(tmp_path / "fold_0_model_best.pt"))
    return with_features


def test_compare_side_by_side(viewer, qtbot, mhim_pair, tmp_path, wait_for):
    import numpy as np

    from napari_mil._napari._compare_layers import ground_truth
    from napari_mil.heatmaps import MASK_LABELS

    state = mhim_pair
    compare = dock(viewer, "Compare teacher | student")
    compare.preset.value = "tcga_abmil"  # random-high, low and random masks all in play
    compare.ratio_h.value = 0.1
    wait_for(qtbot, compare, compare.compare())
    teacher, student = compare.maps["teacher"], compare.maps["student"]
    grid = viewer.canvas.grid
    assert grid.enabled and grid.stride == 6 and tuple(grid.shape) == (1, 2)
    assert [layer.name for layer in viewer.layers][:12] == compare.layer_names("teacher") + compare.layer_names("student")
    assert all(not layer.visible for layer in list(viewer.layers)[12:])  # the rest is hidden meanwhile
    n = len(state.features)
    for kind, expected in (("high", int(0.1 * n)), ("low", int(0.2 * n))):
        frames = viewer.layers[f"student | {MASK_LABELS[kind]}"].data  # 8 x 8 pixels per patch, framed if masked
        assert frames.reshape(frames.shape[0] // 8, 8, -1, 8).any(axis=(1, 3)).sum() == expected
    masked = student.masked["high"] | student.masked["low"] | student.masked["random"]
    assert masked.any() and np.all(student.values[masked] == 0) and student.values.sum() > 0.999
    truth = viewer.layers["teacher | ground truth"]
    tumour, _ = ground_truth(state.slide)
    assert truth.visible and 0 < truth.data.sum() < (tumour > 0).sum()  # the tumour's outline, not its area

    # normalisations share one colour range
    for how in ("raw", "rank", "log", "minmax"):
        compare.norm.value = how
        limits = [tuple(viewer.layers[f"{p} | attention"].contrast_limits) for p in ("teacher", "student")]
        assert limits[0] == limits[1]
    assert "…" in compare.colour_bar.label

    # hover: the patch under the cursor, its attention, rank and masked status
    i = int(np.flatnonzero(student.masked["high"])[0])
    x, y = teacher.coords[i]
    text = compare.describe(y + 10, x + 10)
    assert f"rank {round(teacher.ranks()[i])}/{n}" in text and "masked random-high" in text

    # the gallery: k patches per map (read in a worker); a click centres the linked views on the patch
    qtbot.waitUntil(lambda: not compare.busy, timeout=30_000)
    assert len(compare.gallery) == 2 and len(compare.gallery[0]) == 1 + compare.k.value
    compare.gallery[1][1].clicked.emit()
    best = student.top_k(1)[0]
    s = state.slide.mpp
    centre = (student.coords[best][::-1] + student.patch_size_level0 / 2) * s
    assert np.allclose(viewer.scene.camera.center[-2:], centre)

    # the screenshot has two panels, each with heatmap colours and magenta mask outlines
    compare.opacity.value = 1.0  # pure colour-map colours
    viewer.reset_view()
    qtbot.wait(200)
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    half = shot.shape[1] // 2
    from napari_mil.exports import colormap_lut

    lut = colormap_lut("inferno")[:, :3].astype(int)
    for panel in (shot[:, :half], shot[:, half:]):
        pixels = panel.reshape(-1, 3)
        near = np.abs(pixels[::7, None, :] - lut[None, 30:256:9, :]).sum(-1).min(1) < 12
        assert near.sum() > 50  # heatmap colours present in both panels
        magenta = (pixels[:, 0] > 200) & (pixels[:, 1] < 110) & (pixels[:, 2] > 100)
        assert magenta.sum() > 20  # the random-high outlines

    # exports of the pair
    compare.export_folder.value = str(tmp_path / "exports")
    for fmt in ("GeoJSON", "CSV", "PNG", "top-k"):
        assert compare.export(fmt)
    assert len(list((tmp_path / "exports").rglob("*.png"))) == 2 + 2 * compare.k.value

    compare.single_view()
    assert not grid.enabled and "teacher | attention" not in viewer.layers
    assert viewer.layers[state.slide.name].visible

    # shown again, a layer per event-loop turn; a pair arriving meanwhile is the one shown at the end
    compare.show_pair((teacher, student))
    assert compare.busy and "student | attention" not in viewer.layers
    compare.show_pair((student, teacher), announce=False)
    qtbot.waitUntil(lambda: not compare.busy, timeout=60_000)
    assert viewer.layers["student | attention"].metadata["napari_mil_map"] is teacher
    assert viewer.layers["teacher | attention"].metadata["napari_mil_map"] is student
    assert [layer.name for layer in viewer.layers][:12] == compare.layer_names("teacher") + compare.layer_names("student")
    compare.single_view()


def _pair(state, seed=0):
    """A teacher | student pair over the open slide's grid, masks included."""
    import numpy as np

    from napari_mil.heatmaps import AttentionMap

    grid, rng = state.grid, np.random.default_rng(seed)
    n = len(grid)
    flags = {kind: rng.random(n) < 0.2 for kind in ("high", "low", "random")}
    t = AttentionMap(grid.coords, rng.dirichlet(np.ones(n)), grid.patch_size_level0, name="teacher", masked=flags)
    s = AttentionMap(grid.coords, rng.dirichlet(np.ones(n)), grid.patch_size_level0, name="student", masked=flags)
    return t, s


def test_compare_shows_the_pair_the_state_announces(viewer, qtbot, tiled):
    """Nothing calls the Compare dock: it shows each pair written to the state, and the current
    one when it is opened after it."""
    import numpy as np

    from napari_mil._napari._state import MapPair

    state = tiled.state
    compare = dock(viewer, "Compare teacher | student")
    teacher, student = _pair(state)
    state.pair = MapPair(teacher, student, announce=False)
    qtbot.waitUntil(lambda: not compare.busy and "student | attention" in viewer.layers, timeout=60_000)
    for panel, amap in (("teacher", teacher), ("student", student)):
        layer = viewer.layers[f"{panel} | attention"]
        assert layer.metadata["napari_mil_map"] is amap
        assert np.array_equal(layer.data, amap.image("minmax"), equal_nan=True)
    assert viewer.canvas.grid.enabled and compare.maps == {"teacher": teacher, "student": student}

    newer = _pair(state, seed=1)
    state.pair = MapPair(*newer)  # a new pair updates the layers in place
    qtbot.waitUntil(lambda: not compare.busy, timeout=60_000)
    assert viewer.layers["student | attention"].metadata["napari_mil_map"] is newer[1]
    assert f"over {len(newer[1])} patches" in compare.status.value

    viewer.window.remove_dock_widget(compare.native)
    _process_deletions()
    again = dock(viewer, "Compare teacher | student")  # opened after the pair was made
    qtbot.waitUntil(lambda: not again.busy, timeout=60_000)
    assert again.maps["teacher"] is newer[0] and viewer.layers["teacher | attention"].metadata["napari_mil_map"] is newer[0]


def test_gallery_reads_patches_off_the_gui_thread(viewer, qtbot, tiled, monkeypatch):
    """The top-k patches are read in a worker thread; a request made while one is read replaces
    those still waiting, and the gallery ends with the newest."""
    import threading

    from napari_mil._napari import _gallery
    from napari_mil._napari._state import MapPair

    reads = []
    read = _gallery.read_top_k

    def recording(slide, maps, k):
        reads.append((threading.current_thread(), k))
        return read(slide, maps, k)

    monkeypatch.setattr(_gallery, "read_top_k", recording)
    compare = dock(viewer, "Compare teacher | student")
    tiled.state.pair = MapPair(*_pair(tiled.state))
    qtbot.waitUntil(lambda: not compare.busy, timeout=60_000)
    assert reads and all(thread is not threading.main_thread() for thread, _ in reads)
    assert len(compare.gallery) == 2 and len(compare.gallery[0]) == 1 + compare.k.value

    reads.clear()
    for k in (2, 3, 4):  # one read starts, the next two requests wait: only the newest is read after it
        compare.k.value = k
    qtbot.waitUntil(lambda: not compare.busy, timeout=30_000)
    assert [k for _, k in reads] == [2, 4]
    assert len(compare.gallery[0]) == len(compare.gallery[1]) == 1 + 4


def test_compare_says_what_is_missing(viewer, qtbot, with_features):
    compare = dock(viewer, "Compare teacher | student")
    assert compare.compare() is None and "no teacher and student yet" in compare.status.value
    assert compare.export("CSV") == [] and "show teacher | student first" in compare.status.value


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """Cartoon slides (napari_mil.synthetic): the dock's plumbing, not what it learns."""
    from napari_mil.synthetic import make_cohort

    root = tmp_path_factory.mktemp("cohort")
    return make_cohort(root, n_slides=10, seed=3, width=2560, height=2048, mpp=0.5, burden_range=(0.1, 0.4))


def test_retrain_trains_as_the_cli_does(viewer):
    """The dock's fields start at TrainConfig's defaults, and what it does not show stays at them."""
    from napari_mil.training.trainer import TrainConfig

    defaults = TrainConfig()
    retrain = dock(viewer, "Retrain")
    assert retrain.epochs.value == defaults.epochs and retrain.lr.value == pytest.approx(defaults.lr)
    assert retrain.teacher.value == defaults.teacher == "baseline"
    cfg = retrain.train_config()
    for field in ("patience", "min_epochs", "normalisation", "schedule", "weight_decay", "bag_shift", "init_student"):
        assert getattr(cfg, field) == getattr(defaults, field), field
    assert cfg.mhim is not None and retrain._has_baseline_phase(cfg)
    retrain.teacher.value = "fresh"
    assert retrain.train_config().teacher == "fresh" and not retrain._has_baseline_phase(retrain.train_config())
    retrain.use_mhim.value = False
    assert retrain.train_config().mhim is None and not retrain.teacher.enabled and not retrain.preset.enabled
    from napari_mil.cli import build_parser

    cli = build_parser().parse_args(["train", "labels.csv", "--features", "f", "--out", "o"])
    assert retrain.k.value == cli.folds and retrain.seed.value == cli.seed


def test_retrain_takes_a_setup_from_the_state(viewer, tmp_path):
    """A training setup written to the state (as the teaching demo does) fills the form; what the
    form does not show is kept from the setup's configuration."""
    from napari_mil._napari._state import TrainingSetup
    from napari_mil.training.mhim import MHIMConfig
    from napari_mil.training.trainer import TrainConfig

    retrain = dock(viewer, "Retrain")
    recipe = MHIMConfig(mask_ratio=0.3, mask_ratio_h=0.1, mask_ratio_hr=0.5, mrh_schedule=True, score="class_aware")
    config = TrainConfig(epochs=7, lr=2e-3, seed=4, patience=3, mhim=recipe, teacher="fresh")
    retrain.state.training = TrainingSetup(tmp_path / "labels.csv", tmp_path / "models", config, folds=3)
    assert retrain.cohort.value == tmp_path / "labels.csv" and retrain.checkpoint_dir.value == tmp_path / "models"
    assert (retrain.epochs.value, retrain.seed.value, retrain.k.value, retrain.teacher.value) == (7, 4, 3, "fresh")
    assert retrain.preset.value == "custom" and retrain.mhim_fields["mask_ratio"].value == pytest.approx(0.3)
    assert retrain.train_config() == config


def test_retrain_with_mhim_live_curves_and_maps(viewer, qtbot, small_cohort, tmp_path, wait_for, notifications):
    import csv as csv_module

    import numpy as np

    with open(small_cohort) as fh:
        first = next(csv_module.DictReader(fh))
    slide_dock = dock(viewer, "Slide & tissue")
    viewer.open(small_cohort.parent / first["path"], plugin="napari-mil")
    wait_for(qtbot, slide_dock, slide_dock.detect())
    wait_for(qtbot, slide_dock, slide_dock.tile())
    features = dock(viewer, "Features")
    features.workers.value = 0
    wait_for(qtbot, features, features.extract())

    compare = dock(viewer, "Compare teacher | student")  # it listens to the state: nothing calls it
    retrain = dock(viewer, "Retrain")
    retrain.cohort.value = str(small_cohort)
    retrain.checkpoint_dir.value = str(tmp_path / "models")
    retrain.preset.value = "tcga_abmil"  # one click fills the recipe
    assert retrain.mhim_fields["mask_ratio"].value == pytest.approx(0.7) and retrain.mm_schedule.value
    retrain.epochs.value = 3
    retrain.k.value = 3
    before = len(notifications())
    worker = retrain.train()
    retrain.preset.value = "camelyon16_abmil"  # changed while training: the run keeps what Train captured
    wait_for(qtbot, retrain, worker, timeout=240_000)
    assert retrain.result is not None, retrain.status.value
    assert len(retrain.result.folds) == 3 and not retrain.result.single_split
    # each fold's baseline (the teacher's start) trains first: its curves are series of their own,
    # one fold at a time
    assert len(retrain.loss_plot.series["base"]) == len(retrain.loss_plot.series["base val"]) == 3
    assert len(retrain.loss_plot.series["train"]) == len(retrain.loss_plot.series["val"]) == 3
    assert len(retrain.auc_plot.series["baseline"]) == 3 and retrain.loss_plot.title == "loss, fold 3/3"
    viewed = retrain.viewed.result
    assert viewed.baseline is not None and len(viewed.baseline.history) == 3
    assert len(retrain.mask_plot.series["masked"]) == 3 and retrain.mask_plot.series["masked"][0][1] > 0.5
    assert retrain.epoch_label.value.startswith("MHIM-MIL epoch 3/3")
    # the slides, then each fold's baseline and student epochs
    assert retrain.progress.value == retrain.progress.max == 10 + 3 * 2 * 3
    # the preset's high-attention mask masks nothing in bags this small: said before training
    shown = notifications()[before:]
    assert any("too small" in m and "mask_ratio_h" in m for m in shown), shown
    assert "trained a baseline (3 epochs), then the MHIM-MIL student" in retrain.status.value
    assert "warning: " in retrain.status.value  # the warnings stay in the status line
    # validation and the held-out test folds; the model viewed is the one that held the open slide out
    assert "validation AUC" in retrain.status.value and "pooled out-of-fold test AUC" in retrain.status.value
    assert retrain.viewed.fold == retrain.result.fold_of(first["slide_id"])
    assert f"in fold {retrain.viewed.fold + 1} of 3" in retrain.status.value and "out-of-fold view" in retrain.status.value
    for k in range(3):
        for suffix in ("", "_baseline", "_teacher"):
            assert (tmp_path / "models" / f"abmil_fold{k}{suffix}.safetensors").exists()
    assert (tmp_path / "models" / "predictions.csv").exists() and (tmp_path / "models" / "summary.json").exists()
    state = retrain.state
    assert state.teacher is not None and state.model_meta["encoder"] == "hne_stats"
    assert state.model_meta["train_config"]["mhim"]["mask_ratio"] == pytest.approx(0.7) == state.mhim.mask_ratio
    assert compare.maps  # the live maps of every epoch came through the state
    qtbot.waitUntil(lambda: not compare.busy, timeout=60_000)  # the final comparison, built a layer per turn
    assert viewer.canvas.grid.enabled and "student | attention" in viewer.layers
    student = viewer.layers["student | attention"].metadata["napari_mil_map"]
    assert student.masked["low"].sum() == int(0.2 * len(student)) and np.isfinite(student.values).all()


def test_retrain_gives_the_folds_and_test_predictions_of_the_cli(viewer, qtbot, small_cohort, tmp_path, wait_for):
    """The same seed, the same patient-level folds and the same out-of-fold test predictions as
    ``napari-mil train`` on the same features."""
    import csv as csv_module

    from napari_mil.cli import main

    retrain = dock(viewer, "Retrain")
    retrain.cohort.value = str(small_cohort)
    retrain.features_root.value = str(tmp_path / "features")
    retrain.checkpoint_dir.value = str(tmp_path / "dock")
    retrain.use_mhim.value = False
    retrain.epochs.value, retrain.k.value, retrain.seed.value = 3, 3, 1
    wait_for(qtbot, retrain, retrain.train(), timeout=240_000)
    assert retrain.result is not None, retrain.status.value
    assert len(retrain.result.folds) == 3 and "pooled out-of-fold test AUC" in retrain.status.value
    assert "not in the cohort" in retrain.status.value or "no slide is open" in retrain.status.value

    assert main(["train", str(small_cohort), "--features", str(tmp_path / "features"), "--encoder", "hne_stats",
                 "--folds", "3", "--seed", "1", "--epochs", "3", "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    with open(tmp_path / "cli" / "predictions.csv", newline="") as fh:
        cli = {row["slide_id"]: row for row in csv_module.DictReader(fh)}
    ours = {row["slide_id"]: row for row in retrain.result.rows}
    assert sorted(ours) == sorted(cli) and len(ours) == 10  # every slide tested once
    for slide_id, row in ours.items():
        assert int(row["fold"]) == int(cli[slide_id]["fold"]), slide_id
        assert float(row["probability"]) == pytest.approx(float(cli[slide_id]["probability"]), abs=2e-6), slide_id


def test_retrain_bad_cohorts_and_cancel(viewer, qtbot, small_cohort, tmp_path, wait_for):
    retrain = dock(viewer, "Retrain")
    assert retrain.train() is None and "choose a cohort CSV" in retrain.status.value
    rows = small_cohort.read_text().splitlines()
    missing = tmp_path / "missing.csv"
    missing.write_text("\n".join([rows[0], rows[1].replace(".tif", "_gone.tif"), *rows[2:]]))
    retrain.cohort.value = str(missing)
    assert retrain.train() is None and "do not exist: synthetic_000_gone.tif" in retrain.status.value
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("slide_id,path\nsynthetic_000,synthetic_000.tif\n")
    retrain.cohort.value = str(unlabelled)
    assert retrain.train() is None and "needs a 'label' column" in retrain.status.value

    retrain.cohort.value = str(small_cohort)
    retrain.features_root.value = str(tmp_path / "features")  # nothing cached: extraction first
    retrain.checkpoint_dir.value = str(tmp_path / "models")
    worker = retrain.train()
    qtbot.waitUntil(lambda: retrain.progress.value >= 1, timeout=120_000)  # a slide's features are done
    retrain.cancel()
    wait_for(qtbot, retrain, worker, timeout=120_000)
    message = retrain.status.value.lower()
    assert retrain.result is None and ("cancel" in message or "stopped" in message)
    assert list((tmp_path / "features").rglob("*.h5"))  # what was extracted stays
    assert retrain.train_button.enabled and viewer.layers is not None



def _process_deletions():
    """Let Qt carry out the deletions napari posted (a closed dock, a closed window)."""
    from qtpy.QtCore import QCoreApplication, QEvent
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    QApplication.processEvents()


def test_closing_the_viewer_mid_extraction_stops_it_cleanly(viewer, qtbot, tiled, tmp_path, notifications):
    features = dock(viewer, "Features")
    features.workers.value = 0
    features.batch_size.value = 2
    features.out.value = str(tmp_path / "features")
    features.extract()
    qtbot.waitUntil(lambda: features.progress.value >= 4, timeout=60_000)  # a few batches are done
    before = len(notifications())
    viewer.close()
    _process_deletions()
    assert features.closed and not features._threads  # the extraction thread ended
    assert features.state.features is None  # nothing delivered to the closed viewer
    assert list((tmp_path / "features").rglob("*.partial.h5"))  # the resumable file stays
    # no finished feature file (the grid the features are read from is in patches/, as for napari-mil extract)
    assert not [p for p in (tmp_path / "features").glob("features_*/*.h5") if not p.name.endswith(".partial.h5")]
    assert (tmp_path / "features" / "patches" / f"{tiled.state.slide.name}.h5").exists()
    assert not [m for m in notifications()[before:] if "Error" in m]


def test_closing_the_retrain_dock_mid_training_keeps_the_checkpoint(viewer, qtbot, small_cohort, tmp_path):
    from dataclasses import replace

    retrain = dock(viewer, "Retrain")
    retrain.cohort.value = str(small_cohort)
    retrain.checkpoint_dir.value = str(tmp_path / "models")
    retrain.epochs.value = 500
    retrain.teacher.value = "fresh"  # no baseline phase: the student's checkpoint from the first epoch
    train_config = retrain.train_config
    # a long run, whatever the early stopping (these bags are learned at once)
    retrain.train_config = lambda: replace(train_config(), patience=10_000)
    retrain.train()
    qtbot.waitUntil(lambda: len(retrain.loss_plot.series.get("train", [])) >= 1, timeout=180_000)
    viewer.window.remove_dock_widget(retrain.native)
    _process_deletions()
    assert retrain.closed and not retrain._threads  # training stopped at its next bag
    epochs_seen = len(retrain.loss_plot.series["train"])
    qtbot.wait(300)
    assert len(retrain.loss_plot.series["train"]) == epochs_seen < 500  # no update reached the closed dock
    assert retrain.result is None and retrain.state.model is None
    assert (tmp_path / "models" / "abmil_fold0.safetensors").exists()  # the last good checkpoint
    assert retrain not in viewer.window.dock_widgets.values()


def test_a_closed_compare_dock_lets_go_of_the_viewer(viewer):
    compare = dock(viewer, "Compare teacher | student")
    events = compare.state.events
    listening = {name: len(getattr(events, name)) for name in ("pair", "model", "features")}
    assert all(n >= 1 for n in listening.values())
    assert compare._on_mouse_move in viewer.mouse_move_callbacks
    viewer.window.remove_dock_widget(compare.native)
    _process_deletions()
    assert compare.closed
    assert {name: len(getattr(events, name)) for name in listening} == {k: n - 1 for k, n in listening.items()}
    assert compare._on_mouse_move not in viewer.mouse_move_callbacks
    again = dock(viewer, "Compare teacher | student")
    assert not again.closed and len(events.pair) == listening["pair"]


def test_after_runs_for_a_worker_that_already_finished(viewer, qtbot, tiled):
    """The teaching demo chains steps with after(): a worker that ends before the next step
    listens (a 28-patch tiling takes milliseconds) must still hand on, and its error with it."""
    worker = tiled.tile()
    qtbot.waitUntil(lambda: not tiled.is_running(worker), timeout=60_000)  # finished and handled
    seen = []
    tiled.after(worker, seen.append)
    qtbot.waitUntil(lambda: seen == [None], timeout=5_000)

    from napari.qt.threading import create_worker

    def broken():
        raise ValueError("disk full")

    errored = tiled._start(create_worker(broken, _ignore_errors=True), lambda _: None)
    qtbot.waitUntil(lambda: not tiled.is_running(errored), timeout=5_000)
    tiled.after(errored, seen.append)
    qtbot.waitUntil(lambda: len(seen) == 2, timeout=5_000)
    assert isinstance(seen[1], ValueError) and "disk full" in str(seen[1])


def test_gui_steps_take_one_event_loop_turn_each(viewer, qtbot, tiled, notifications):
    """Long GUI work (the comparison's twelve layers) runs a step per turn: the loop handles other
    events between steps, a worker's end waits for the steps its result started, and a failing step
    becomes a notification that drops the rest."""
    from napari.qt.threading import create_worker
    from qtpy.QtCore import QTimer

    seen = []

    def first():
        seen.append("first")
        QTimer.singleShot(0, lambda: seen.append("the loop ran"))

    worker = tiled._start(create_worker(lambda: 1, _ignore_errors=True),
                          lambda _: tiled._in_turns([first, lambda: seen.append("second")]))
    tiled.after(worker, lambda error: seen.append(("after", error)))
    qtbot.waitUntil(lambda: len(seen) == 4, timeout=10_000)
    assert seen == ["first", "the loop ran", "second", ("after", None)]
    assert not tiled.busy

    def broken():
        raise ValueError("no such layer")

    tiled._in_turns([broken, lambda: seen.append("never")])
    assert tiled.busy
    qtbot.waitUntil(lambda: not tiled.busy, timeout=10_000)
    assert "never" not in seen and "no such layer" in tiled.status.value
    assert any("no such layer" in m for m in notifications())

    tiled._in_turns([lambda: seen.append("never either")])
    tiled.close_dock()  # its viewer closed: what is left is dropped
    qtbot.wait(100)
    assert "never either" not in seen and not tiled.busy


def test_retrain_dock_shows_transmil_sizes_only_for_transmil(make_napari_viewer, tmp_path):
    from napari_mil._napari._retrain_widget import RetrainWidget

    dock = RetrainWidget(make_napari_viewer())
    hidden = lambda: [box.native.isHidden() for box in dock.transmil_fields.values()]  # noqa: E731
    assert hidden() == [True] * 3 and dock.train_config().model_cfg == {}
    dock.model_name.value = "transmil"
    assert hidden() == [False] * 3
    dock.transmil_fields["dim"].value, dock.transmil_fields["heads"].value = 64, 4
    dock.transmil_fields["landmarks"].value = 32
    assert dock.train_config().model_cfg == {"dim": 64, "heads": 4, "landmarks": 32}

    dock.transmil_fields["heads"].value = 6  # 64 is no multiple of 6: refused before any work starts
    (tmp_path / "a.tif").write_bytes(b"")
    (tmp_path / "b.tif").write_bytes(b"")
    (tmp_path / "cohort.csv").write_text("slide_id,label,path\na,0,a.tif\nb,1,b.tif\n")
    dock.cohort.value = str(tmp_path / "cohort.csv")
    assert dock.train() is None and "multiple of its heads" in dock.status.value
    dock.model_name.value = "abmil"
    assert hidden() == [True] * 3 and dock.train_config().model_cfg == {}
