"""The trainer on real features of a synthetic cohort: it learns, it checkpoints, it refuses bad input."""

import csv
import json

import numpy as np
import pytest
import torch

from napari_mil.errors import NapariMilError
from napari_mil.features.store import FeatureBag, feature_path
from napari_mil.training.checkpoints import CheckpointError, load_checkpoint, load_teacher
from napari_mil.training.data import CohortError, load_bags, patient_folds, read_labels
from napari_mil.training.metrics import roc_auc
from napari_mil.training.mhim import preset
from napari_mil.training.trainer import TrainConfig, TrainingCancelled, predict_probs, train


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """16 small synthetic slides (8 with tumour), tiled at 20x and encoded with hne_stats."""
    from napari_mil.encoders import create_encoder
    from napari_mil.features.extract import extract_features
    from napari_mil.slide import open_slide
    from napari_mil.synthetic import make_cohort
    from napari_mil.tiling import make_patch_grid
    from napari_mil.tissue import detect_tissue

    root = tmp_path_factory.mktemp("cohort")
    labels_csv = make_cohort(root, n_slides=16, seed=5, width=4096, height=3072, mpp=0.5, burden_range=(0.05, 0.4))
    encoder = create_encoder("hne_stats", device="cpu")
    for row in csv.DictReader(open(labels_csv)):
        with open_slide(root / row["path"]) as slide:
            grid = make_patch_grid(slide, detect_tissue(slide, "biopsy"), magnification=20, min_tissue=0.3)
        extract_features(root / row["path"], grid, encoder, root / "run", num_workers=0)
    return root, labels_csv


@pytest.fixture(scope="module")
def bags(cohort):
    root, labels_csv = cohort
    return load_bags(read_labels(labels_csv), root / "run", "hne_stats")


def test_folds_keep_patients_apart(bags):
    for fold in patient_folds(bags, k=4, seed=0):
        parts = {name: {bags[i].patient_id for i in idx} for name, idx in fold.items()}
        assert not (parts["train"] & parts["val"]) and not (parts["train"] & parts["test"]) and not (parts["val"] & parts["test"])
        assert len(fold["val"]) and len(fold["test"])
        assert {bags[i].label for i in fold["test"]} == {0, 1}  # stratified
    all_test = np.concatenate([f["test"] for f in patient_folds(bags, k=4, seed=0)])
    assert sorted(all_test) == list(range(len(bags)))


def test_short_training_learns(bags, tmp_path):
    fold = patient_folds(bags, k=2, seed=0)[0]  # 8 held-out test slides, 4 with tumour
    pick = lambda name: [bags[i] for i in fold[name]]  # noqa: E731
    cfg = TrainConfig(model="abmil", epochs=15, lr=1e-3, patience=15, seed=0)
    result = train(pick("train"), pick("val"), cfg, checkpoint=tmp_path / "abmil")
    probs, _ = predict_probs(result.model, pick("test"), "cpu")
    assert len(pick("test")) == 8
    assert roc_auc([b.label for b in pick("test")], probs[:, 1]) >= 0.85
    assert result.best_epoch >= 1 and 0 <= result.threshold <= 1
    assert (tmp_path / "abmil.safetensors").exists() and json.loads((tmp_path / "abmil.json").read_text())["in_dim"] == 38


def test_training_is_deterministic_and_checkpoints_reload(bags, tmp_path):
    cfg = TrainConfig(model="abmil_gated", epochs=3, seed=7)
    a = train(bags[:10], bags[10:], cfg, checkpoint=tmp_path / "a")
    b = train(bags[:10], bags[10:], cfg)
    assert [h.train_loss for h in a.history] == [h.train_loss for h in b.history]
    model, meta = load_checkpoint(tmp_path / "a", feature_dim=38)
    np.testing.assert_allclose(predict_probs(model, bags[10:], "cpu")[0], predict_probs(a.model, bags[10:], "cpu")[0], rtol=1e-5)
    assert meta["model"] == "abmil_gated" and "threshold" in meta


def test_mhim_mode_trains_and_reports_masking(bags):
    cfg = TrainConfig(model="abmil", epochs=2, seed=0, mhim=preset("tcga_abmil", mm=0.9))
    result = train(bags[:10], bags[10:], cfg)
    assert all(h.mask_ratio > 0.5 for h in result.history)  # 70% random + 20% low masking
    assert len(result.mhim.history) == 2 * 10


def test_cancel_mid_epoch_keeps_the_last_good_checkpoint(bags, tmp_path):
    steps = []

    def cancel():
        steps.append(1)
        return len(steps) > 15  # past the first epoch of 10 bags

    with pytest.raises(TrainingCancelled, match="best checkpoint kept"):
        train(bags[:10], bags[10:], TrainConfig(epochs=5), checkpoint=tmp_path / "c", cancel=cancel)
    model, meta = load_checkpoint(tmp_path / "c", feature_dim=38)
    assert meta["epoch"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_a_cancelled_training_lets_go_of_its_models(bags):
    """What a cancelled run held (models, optimiser state: GPU memory on a GPU) is freed once the
    error is raised, though the caller keeps the error and its traceback."""
    import weakref

    held = {}
    cfg = TrainConfig(epochs=3, mhim=preset("camelyon16_abmil"), teacher="fresh")
    with pytest.raises(TrainingCancelled) as caught:
        train(bags[:10], bags[10:], cfg, cancel=lambda: "model" in held,
              on_start=lambda model, mhim: held.update(model=weakref.ref(model), teacher=weakref.ref(mhim.teacher)))
    assert caught.value.__traceback__ is not None
    assert held["model"]() is None and held["teacher"]() is None


def test_checkpoint_of_other_features_or_architecture(bags, tmp_path):
    train(bags[:10], bags[10:], TrainConfig(epochs=1), checkpoint=tmp_path / "m")
    with pytest.raises(CheckpointError, match="expects 38-d features .* these have 1024"):
        load_checkpoint(tmp_path / "m", feature_dim=1024)
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["model"] = "transmil"
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit a transmil model"):
        load_checkpoint(tmp_path / "m")
    (tmp_path / "x.json").write_text("{}")
    (tmp_path / "x.safetensors").write_bytes(b"0")
    with pytest.raises(CheckpointError, match="not a napari-mil checkpoint"):
        load_checkpoint(tmp_path / "x")


# ---- bad cohorts --------------------------------------------------------------------------
def write_csv(path, rows, header=("slide_id", "label", "patient_id")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_labels_without_features_are_listed(cohort, tmp_path):
    root, _ = cohort
    labels = write_csv(tmp_path / "l.csv", [("synthetic_000", 0, "p"), ("ghost_1", 1, "q"), ("ghost_2", 1, "r")])
    with pytest.raises(CohortError, match="2 slide\\(s\\) .* no hne_stats features .*ghost_1, ghost_2.*napari-mil extract"):
        load_bags(read_labels(labels), root / "run", "hne_stats")


@pytest.mark.parametrize("rows, message", [
    ([("a", 0), ("b", 0)], "only class 0"),
    ([("a", 0), ("b", "tumour")], "not a class number"),
    ([("a", 0), ("b", 2)], "consecutive class numbers"),
    ([], "lists no slides"),
])
def test_bad_labels(tmp_path, rows, message):
    with pytest.raises(CohortError, match=message):
        read_labels(write_csv(tmp_path / "l.csv", rows, ("slide_id", "label")))


def test_missing_label_column(tmp_path):
    with pytest.raises(CohortError, match="needs a 'label' column"):
        read_labels(write_csv(tmp_path / "l.csv", [("a", "x")], ("slide_id", "diagnosis")))


def test_empty_bag_and_nan_features(tmp_path):
    run = tmp_path / "run"
    FeatureBag(np.zeros((0, 4), np.float32), np.zeros((0, 2)), {}).save(feature_path(run, "e", "empty"))
    nan = np.ones((3, 4), np.float32)
    nan[1, 2] = np.nan
    FeatureBag(nan, np.zeros((3, 2)), {}).save(feature_path(run, "e", "nan"))
    FeatureBag(np.ones((3, 4), np.float32), np.zeros((3, 2)), {}).save(feature_path(run, "e", "ok"))
    with pytest.raises(CohortError, match="empty: the bag is empty"):
        load_bags(read_labels(write_csv(tmp_path / "a.csv", [("empty", 0, "p"), ("ok", 1, "q")])), run, "e")
    with pytest.raises(CohortError, match="nan: 1 patches have NaN"):
        load_bags(read_labels(write_csv(tmp_path / "b.csv", [("nan", 0, "p"), ("ok", 1, "q")])), run, "e")


def test_training_needs_validation_slides(bags):
    with pytest.raises(NapariMilError, match="validation"):
        train(bags, [], TrainConfig(epochs=1))


def test_cli_train_then_predict(cohort, tmp_path):
    import h5py

    from napari_mil.cli import main

    root, labels_csv = cohort
    out = tmp_path / "models"
    assert main(["train", str(labels_csv), "--features", str(root / "run"), "--folds", "2", "--epochs", "4",
                 "--mhim", "camelyon16_abmil", "--out", str(out), "-q"]) == 0
    predictions = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(predictions) == 16 and {p["fold"] for p in predictions} == {"0", "1"}
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["folds"]) == 2 and 0 <= summary["test_auc_mean"] <= 1
    assert (out / "abmil_fold0.safetensors").exists()

    slides = ["synthetic_000", "synthetic_001"]
    assert main(["predict", *slides, "--checkpoint", str(out / "abmil_fold0"), "--features", str(root / "run"),
                 "--out", str(tmp_path / "pred"), "-q"]) == 0
    with h5py.File(tmp_path / "pred" / "attention" / "synthetic_000.h5") as fh:
        attention, coords = fh["attention"][:], fh["coords"][:]
    assert len(attention) == len(coords) and abs(attention.sum() - 1) < 1e-4


def test_cli_train_refuses_labels_without_features(cohort, tmp_path, capsys):
    from napari_mil.cli import main

    root, labels_csv = cohort
    labels = write_csv(tmp_path / "l.csv", [("synthetic_000", 0, "p"), ("nowhere", 1, "q")])
    assert main(["train", str(labels), "--features", str(root / "run"), "--out", str(tmp_path / "m")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["train", str(labels_csv), "--features", str(root / "run"), "--mhim", "c17", "--out", str(tmp_path / "m")]) == 2
    assert "unknown MHIM preset 'c17'" in capsys.readouterr().err


def test_mhim_teacher_starts_from_a_baseline_checkpoint(bags, tmp_path):
    base = train(bags[:10], bags[10:13], TrainConfig(epochs=2, seed=1), checkpoint=tmp_path / "baseline")
    cfg = TrainConfig(epochs=1, seed=2, mhim=preset("camelyon16_abmil", mm=1.0), teacher_init=str(tmp_path / "baseline"))
    result = train(bags[:10], bags[10:13], cfg, checkpoint=tmp_path / "mhim")
    for name, value in result.mhim.teacher.state_dict().items():  # mm = 1: the teacher stays the baseline
        assert torch.equal(value, base.model.state_dict()[name]), name
    # the run's checkpoint keeps its teacher beside the student
    student, meta = load_checkpoint(tmp_path / "mhim")
    teacher = load_teacher(tmp_path / "mhim", meta)
    assert meta["teacher"] == "mhim_teacher" and torch.equal(teacher.embed[0].weight, base.model.embed[0].weight)
    assert load_teacher(tmp_path / "baseline", load_checkpoint(tmp_path / "baseline")[1]) is None
    fresh = train(bags[:10], bags[10:13], TrainConfig(epochs=1, seed=2, mhim=preset("camelyon16_abmil", mm=1.0),
                                                      teacher="fresh"))
    assert not torch.equal(fresh.mhim.teacher.embed[0].weight, base.model.embed[0].weight)

    with pytest.raises(CheckpointError, match="the teacher's baseline is a abmil"):
        train(bags[:10], bags[10:13], TrainConfig(model="transmil", epochs=1, mhim=preset("camelyon16_transmil"),
                                                  teacher_init=str(tmp_path / "baseline")))
    with pytest.raises(NapariMilError, match="needs MHIM-MIL mode"):
        train(bags[:10], bags[10:13], TrainConfig(epochs=1, teacher_init=str(tmp_path / "baseline")))


def test_a_validation_loss_that_is_never_finite_is_reported():
    from napari_mil.training.data import Bag

    np.random.default_rng(0)
    bags = [Bag(f"s{i}", i % 2, f"p{i}", np.full((5, 4), np.inf, np.float32), np.zeros((5, 2)))
            for i in range(6)]
    with pytest.raises(NapariMilError, match="validation loss was never finite"):
        train(bags[:4], bags[4:], TrainConfig(epochs=2))


def test_mhim_trains_its_baseline_first_by_default(bags, tmp_path):
    """The official recipe: a plain baseline, then the teacher from it and the student's
    embedding from it (init_stu_type=fc); the student's attention and classifier start fresh."""
    starts, phases = [], []
    cfg = TrainConfig(epochs=2, min_epochs=1, seed=3, mhim=preset("camelyon16_abmil", mm=1.0))
    result = train(bags[:10], bags[10:13], cfg, checkpoint=tmp_path / "m",
                   on_start=lambda model, mhim: starts.append(({k: v.clone() for k, v in model.state_dict().items()},
                                                               mhim)),
                   on_epoch=lambda r: phases.append(r.phase))
    assert phases == ["baseline", "baseline", "train", "train"]
    assert result.baseline is not None and starts[0][1] is None and starts[1][1] is result.mhim
    baseline = result.baseline.model.state_dict()
    for name, value in result.mhim.teacher.state_dict().items():  # mm = 1: the teacher is the baseline's best epoch
        assert torch.equal(value, baseline[name]), name
    student_start = starts[1][0]
    assert torch.equal(student_start["embed.0.weight"], baseline["embed.0.weight"])  # fc from the baseline
    assert not torch.equal(student_start["attn_w.weight"], baseline["attn_w.weight"])  # the rest fresh
    assert (tmp_path / "m_baseline.safetensors").exists() and (tmp_path / "m_teacher.safetensors").exists()
    # init_student="none": nothing of the baseline in the student
    none = []
    plain = train(bags[:10], bags[10:13], TrainConfig(epochs=1, min_epochs=1, seed=3, mhim=cfg.mhim, init_student="none"),
                  on_start=lambda model, mhim: none.append(model.embed[0].weight.detach().clone()))
    assert torch.equal(none[1], none[0])  # the student starts where the baseline started, untrained
    assert not torch.equal(none[1], plain.baseline.model.embed[0].weight)


def test_normalisation_is_fitted_on_training_bags_and_travels_in_the_checkpoint(bags, tmp_path):
    from napari_mil.training.data import Bag
    from napari_mil.training.normalise import FeatureNormaliser

    train_bags, val_bags = bags[:10], bags[10:]
    result = train(train_bags, val_bags, TrainConfig(epochs=1, min_epochs=1), checkpoint=tmp_path / "n")
    stacked = np.concatenate([b.features for b in train_bags])
    meta = json.loads((tmp_path / "n.json").read_text())
    assert meta["normalisation"]["kind"] == "global"
    np.testing.assert_allclose(meta["normalisation"]["mean"], stacked.mean(0), rtol=1e-4, atol=1e-6)
    model, _ = load_checkpoint(tmp_path / "n", feature_dim=38)
    np.testing.assert_allclose(predict_probs(model, val_bags, "cpu")[0], predict_probs(result.model, val_bags, "cpu")[0],
                               rtol=1e-5)
    # the model normalises raw features itself: the same as the bare network on normalised ones
    normaliser = FeatureNormaliser.from_meta(meta["normalisation"], 38)
    bare, _ = load_checkpoint(tmp_path / "n", feature_dim=38)
    from napari_mil.training.normalise import detach

    detach(bare)
    scaled = [Bag(b.slide_id, b.label, b.patient_id, ((b.features - normaliser.mean) / normaliser.std).astype(np.float32),
                  b.coords) for b in val_bags]
    np.testing.assert_allclose(predict_probs(bare, scaled, "cpu")[0], predict_probs(model, val_bags, "cpu")[0],
                               rtol=1e-4, atol=1e-6)
    # statistics that do not fit: another length, or not finite
    for bad in ({**meta["normalisation"], "mean": meta["normalisation"]["mean"][:-1]},
                {**meta["normalisation"], "std": [0.0] * 38}, {"kind": "global"}):
        (tmp_path / "n.json").write_text(json.dumps({**meta, "normalisation": bad}))
        with pytest.raises(CheckpointError, match="normalis"):
            load_checkpoint(tmp_path / "n", feature_dim=38)


def test_a_run_that_does_not_learn_says_so():
    from napari_mil.training.data import Bag

    rng = np.random.default_rng(0)  # labels unrelated to the features: nothing to learn
    noise = [Bag(f"s{i}", i % 2, f"p{i}", rng.normal(size=(20, 6)).astype(np.float32), np.zeros((20, 2)))
             for i in range(16)]
    result = train(noise[:12], noise[12:], TrainConfig(epochs=3, min_epochs=1, lr=1e-5))
    assert any("did not learn" in w for w in result.warnings)


def test_mhim_warns_when_bags_are_too_small_for_the_high_attention_mask(bags):
    from napari_mil.training.trainer import mhim_bag_size_warnings

    small = [b for b in bags if len(b.features) < 200]
    warnings_ = mhim_bag_size_warnings(preset("camelyon16_abmil"), small)
    assert len(warnings_) == 1 and "every training bag is too small" in warnings_[0] and "200" in warnings_[0]
    assert mhim_bag_size_warnings(preset("camelyon16_abmil", mask_ratio_h=0.5), small) == []


def test_mixed_precision_is_bfloat16_where_the_gpu_has_it_else_float16_with_a_scaler(monkeypatch):
    import contextlib

    from napari_mil.training.trainer import autocast_settings

    assert autocast_settings(torch.device("cpu")) == (None, False)
    assert autocast_settings(torch.device("mps")) == (None, False)
    cuda = torch.device("cuda", 0)
    asked = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: asked.append(device) or contextlib.nullcontext())
    for native, expected in ((True, (torch.bfloat16, False)), (False, (torch.float16, True))):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, native=native:
                            native and not including_emulation)  # emulated bfloat16 does not count
        assert autocast_settings(cuda) == expected
        assert autocast_settings(cuda, amp=False) == (None, False)
    assert asked == [cuda, cuda]  # the GPU trained on is the one asked


@pytest.mark.parametrize("setting", [(torch.bfloat16, False), (torch.float16, True)])
def test_mixed_precision_training_steps(monkeypatch, setting):
    """The loop under each mixed-precision setting (run on the CPU's autocast here; on CUDA in
    test_gpu.py): it learns, and with float16's GradScaler the steps it skips for overflowing
    gradients do not advance the learning-rate schedule."""
    import napari_mil.training.trainer as trainer
    from napari_mil.training.data import Bag

    rng = np.random.default_rng(0)
    bags = [Bag(f"s{i}", i % 2, f"p{i}", (rng.normal(size=(30, 8)) + i % 2).astype(np.float32), np.zeros((30, 2)))
            for i in range(10)]
    monkeypatch.setattr(trainer, "autocast_settings", lambda device, amp=True: setting)
    made = {"scaler": [], "schedule": []}

    def spy(cls, key):  # cls, noting each instance made
        class Spy(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made[key].append(self)

        return Spy

    monkeypatch.setattr(torch.amp, "GradScaler", spy(torch.amp.GradScaler, "scaler"))
    monkeypatch.setattr(torch.optim.lr_scheduler, "CosineAnnealingLR", spy(torch.optim.lr_scheduler.CosineAnnealingLR,
                                                                           "schedule"))
    result = trainer.train(bags[:8], bags[8:], TrainConfig(model="transmil", epochs=4, min_epochs=1, lr=1e-3,
                                                           model_cfg={"dim": 32, "heads": 2, "landmarks": 8}))
    losses = [r.train_loss for r in result.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert len(made["scaler"]) == int(setting[1])
    schedule = made["schedule"][0]
    taken = max(int(state["step"]) for state in schedule.optimizer.state.values())  # Adam's count of its steps
    assert schedule.last_epoch == taken
    if made["scaler"]:  # float16's first steps overflow at the initial scale of 2^16 and are skipped
        assert made["scaler"][0].get_scale() < 2.0**16 and taken < 4 * 8
    else:
        assert taken == 4 * 8
