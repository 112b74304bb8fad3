"""Research workflow: labels CSVs of other tools, predict with the checkpoint's own encoder and
teacher, out-of-fold attention in one command, pooled AUC, model sizes, readable logs."""

import csv
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from napari_mil.cli import main
from napari_mil.features.store import FeatureBag, feature_path
from napari_mil.training.data import CohortError, read_labels
from napari_mil.training.metrics import cross_validation_summary, roc_auc
from napari_mil.training.checkpoints import load_checkpoint, save_checkpoint

ENCODER = "toy"  # not the CLI's default encoder: predict must find it in the checkpoint


def write_cohort(root, n=12, dim=8, seed=0, sizes=(210, 260)):
    """n tiny random bags (positives carry a few shifted patches) under features_toy/, and labels.csv."""
    rng = np.random.default_rng(seed)
    rows = ["slide_id,patient_id,label"]
    for i in range(n):
        label = i % 2
        size = int(rng.integers(*sizes))  # by default enough instances for MHIM-MIL's high-attention masks
        features = rng.normal(size=(size, dim)).astype(np.float32)
        if label:
            features[:20] += 2.0
        coords = np.stack([np.arange(size) % 16, np.arange(size) // 16], 1) * 256
        attrs = {"encoder": ENCODER, "patch_size_level0": 256, "patch_size": 256, "overlap": 0}
        FeatureBag(features, coords, attrs).save(feature_path(root, ENCODER, f"s{i:02d}"))
        rows.append(f"s{i:02d},p{i:02d},{label}")
    labels = root / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return labels


def train_cli(root, labels, out, *extra):
    return main(["train", str(labels), "--features", str(root), "--encoder", ENCODER, "--folds", "3",
                 "--epochs", "2", "--out", str(out), "-q", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-fold plain ABMIL run and a 3-fold MHIM-MIL run on 12 tiny bags."""
    root = tmp_path_factory.mktemp("workflow")
    labels = write_cohort(root)
    assert train_cli(root, labels, root / "plain") == 0
    assert train_cli(root, labels, root / "mhim", "--mhim", "camelyon16_abmil") == 0
    return root, labels


def model_output(checkpoint, slide, root):
    model, meta = load_checkpoint(checkpoint)
    bag = FeatureBag.load(feature_path(root, ENCODER, slide))
    with torch.no_grad():
        out = model(torch.from_numpy(bag.features)[None])
    return torch.softmax(out.logits, 1)[0, -1].item(), out.attention[0].numpy()


# ---- labels CSV ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, patient", [
    ("case_id,slide_id,label\ncase_a,slide_a,1\ncase_b,slide_b,0\n", "case_a"),  # CLAM, TRIDENT
    ("slide,patient,label\nslide_a,case_a,1\nslide_b,case_b,0\n", "case_a"),
    ("slide_id,patient_id,label\nslide_a,case_a,1\nslide_b,case_b,0\n", "case_a"),
    ("\ufeff Slide_ID ,Label\nslide_a,1\nslide_b,0\n", "slide_a"),  # a spreadsheet's BOM, capitals, spaces
])
def test_labels_column_aliases(tmp_path, text, patient):
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8")
    records = read_labels(path)
    assert [(r.slide_id, r.label) for r in records] == [("slide_a", 1), ("slide_b", 0)]
    assert records[0].patient_id == patient


def test_cohort_csv_with_aliases_finds_its_paths(tmp_path):
    from napari_mil.usecases.cohort import read_cohort

    for name in ("a.tif", "b.tif"):
        (tmp_path / name).write_bytes(b"")
    path = tmp_path / "cohort.csv"
    path.write_text("case_id,slide,label,path\nc1,a,0,a.tif\nc2,b,1,b.tif\n")
    slides = read_cohort(path)
    assert [(s.record.slide_id, s.record.patient_id, s.path.name) for s in slides] == [("a", "c1", "a.tif"),
                                                                                       ("b", "c2", "b.tif")]


def test_unknown_columns_say_what_was_found_and_what_is_accepted(tmp_path, capsys):
    path = tmp_path / "labels.csv"
    path.write_text("image,diagnosis\nx,1\ny,0\n")
    with pytest.raises(CohortError) as err:
        read_labels(path)
    message = str(err.value)
    assert "'image', 'diagnosis'" in message
    assert "slide_id or slide" in message and "patient_id or case_id or patient" in message and "label" in message
    assert main(["train", str(path), "--features", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "'image', 'diagnosis'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # nothing started


@pytest.mark.parametrize("rows, message", [
    ("a,0\nb,1\na,1\n", "slide 'a' is listed twice (first on line 2)"),
    ("a,0\n../b,1\n", "'../b' cannot name a file (it contains '/')"),
    ("a,0\nx..y,1\n", "it contains '..'"),
    ("a,0\nb\\c,1\n", "it contains '\\\\'"),
    ("a,0\n,1\n", "line 3: slide ID '' cannot name a file (it is empty)"),
])
def test_duplicate_and_unsafe_slide_ids_are_refused(tmp_path, rows, message):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\n" + rows)
    with pytest.raises(CohortError, match="line") as err:
        read_labels(path)
    assert message in str(err.value)


# ---- predict ---------------------------------------------------------------------------------
def test_predict_reads_the_encoder_from_the_checkpoint(run, tmp_path, capsys):
    root, _ = run
    checkpoint = root / "plain" / "abmil_fold0"
    assert load_checkpoint(checkpoint)[1]["encoder"] == ENCODER
    assert main(["predict", "s00", "s01", "--checkpoint", str(checkpoint), "--features", str(root),
                 "--out", str(tmp_path / "p"), "-q"]) == 0  # no --encoder: the checkpoint's
    assert "note" not in capsys.readouterr().err
    prob, attention = model_output(checkpoint, "s01", root)
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "p" / "predictions.csv"))}
    assert float(rows["s01"]["probability"]) == pytest.approx(prob, abs=1e-6)
    with h5py.File(tmp_path / "p" / "attention" / "s01.h5") as fh:
        np.testing.assert_allclose(fh["attention"][:], attention, atol=1e-6)

    # a checkpoint that records no encoder falls back to hne_stats, and says so
    bare = tmp_path / "bare"
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    del meta["encoder"]
    bare.with_suffix(".json").write_text(json.dumps(meta))
    bare.with_suffix(".safetensors").write_bytes(checkpoint.with_suffix(".safetensors").read_bytes())
    assert main(["predict", "s00", "--checkpoint", str(bare), "--features", str(root),
                 "--out", str(tmp_path / "q"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "records no encoder: reading hne_stats features" in err and "--encoder" in err
    assert main(["predict", "s00", "--checkpoint", str(bare), "--features", str(root), "--encoder", ENCODER,
                 "--out", str(tmp_path / "q"), "-q"]) == 0


def test_part_teacher_without_a_teacher_is_an_error(run, tmp_path):
    root, _ = run
    result = subprocess.run([sys.executable, "-m", "napari_mil.cli", "predict", "s00", "--checkpoint",
                             str(root / "plain" / "abmil_fold0"), "--part", "teacher", "--features", str(root),
                             "--out", str(tmp_path / "p")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "abmil_fold0 has no teacher" in result.stderr and "--part student" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "p").exists()  # not the student's maps in silence


def test_part_teacher_predicts_with_the_teacher(run, tmp_path):
    root, _ = run
    checkpoint = root / "mhim" / "abmil_fold1"
    assert main(["predict", "s03", "--checkpoint", str(checkpoint), "--part", "teacher", "--features", str(root),
                 "--out", str(tmp_path / "t"), "-q"]) == 0
    assert main(["predict", "s03", "--checkpoint", str(checkpoint), "--features", str(root),
                 "--out", str(tmp_path / "s"), "-q"]) == 0
    teacher_prob, teacher_attention = model_output(root / "mhim" / "abmil_fold1_teacher", "s03", root)
    student_prob, _ = model_output(checkpoint, "s03", root)
    with h5py.File(tmp_path / "t" / "attention" / "s03.h5") as fh:
        np.testing.assert_allclose(fh["attention"][:], teacher_attention, atol=1e-6)
        assert fh.attrs["probability"] == pytest.approx(teacher_prob, abs=1e-6)
        assert fh.attrs["part"] == "teacher"
    with h5py.File(tmp_path / "s" / "attention" / "s03.h5") as fh:
        assert fh.attrs["probability"] == pytest.approx(student_prob, abs=1e-6)
    assert teacher_prob != pytest.approx(student_prob, abs=1e-7)  # two models, told apart


def test_a_teacher_of_another_architecture_is_refused(run, tmp_path, capsys):
    from napari_mil.models import create_model

    root, _ = run
    for suffix in (".json", ".safetensors"):
        for name in ("abmil_fold0", "abmil_fold0_teacher"):
            (tmp_path / (name + suffix)).write_bytes((root / "mhim" / (name + suffix)).read_bytes())
    meta = json.loads((tmp_path / "abmil_fold0_teacher.json").read_text())
    other = create_model("abmil_gated", meta["in_dim"], meta["n_classes"])
    save_checkpoint(tmp_path / "abmil_fold0_teacher", other, {**meta, "model": "abmil_gated"})
    assert main(["predict", "s00", "--checkpoint", str(tmp_path / "abmil_fold0"), "--part", "teacher",
                 "--features", str(root), "--out", str(tmp_path / "p"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "abmil_fold0_teacher is not the teacher of abmil_fold0" in err
    assert "the teacher is a abmil_gated" in err and "the student a abmil" in err
    assert not (tmp_path / "p").exists()


# ---- out of fold -------------------------------------------------------------------------------
def test_out_of_fold_attention_comes_from_each_slides_own_fold(run, tmp_path, capsys):
    root, _ = run
    models, out = root / "plain", tmp_path / "oof"
    capsys.readouterr()
    assert main(["predict", "--oof", str(models), "--features", str(root), "--out", str(out)]) == 0
    assert "12 slides out of fold" in capsys.readouterr().out
    trained = list(csv.DictReader(open(models / "predictions.csv")))
    predicted = {r["slide_id"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    assert sorted(predicted) == sorted(r["slide_id"] for r in trained) == [f"s{i:02d}" for i in range(12)]
    assert sorted(p.name for p in (out / "attention").iterdir()) == [f"s{i:02d}.h5" for i in range(12)]
    told_apart = 0
    for row in trained:
        slide, fold = row["slide_id"], int(row["fold"])
        assert int(predicted[slide]["fold"]) == fold
        prob, attention = model_output(models / f"abmil_fold{fold}", slide, root)
        assert float(predicted[slide]["probability"]) == pytest.approx(prob, abs=1e-6)
        assert float(row["probability"]) == pytest.approx(prob, abs=1e-5)  # what train recorded
        with h5py.File(out / "attention" / f"{slide}.h5") as fh:
            np.testing.assert_allclose(fh["attention"][:], attention, atol=1e-6)
            assert fh.attrs["fold"] == fold and fh.attrs["patch_size_level0"] == 256
        others = [model_output(models / f"abmil_fold{k}", slide, root)[0] for k in range(3) if k != fold]
        told_apart += all(abs(o - prob) > 1e-6 for o in others)
    assert told_apart == 12  # another fold's model would have given another probability

    # the OOF files are what export reads
    assert main(["export", str(out / "attention" / "s00.h5"), "--out", str(tmp_path / "maps"), "--formats", "csv",
                 "-q"]) == 0
    with open(tmp_path / "maps" / "s00.csv") as fh:
        assert next(csv.DictReader(fh))["width"] == "256"


def test_out_of_fold_subset_teacher_and_missing_pieces(run, tmp_path, capsys):
    root, _ = run
    assert main(["predict", "s00", "s05", "--oof", str(root / "mhim"), "--part", "teacher", "--features", str(root),
                 "--out", str(tmp_path / "t"), "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "t" / "attention").iterdir()) == ["s00.h5", "s05.h5"]
    fold = {r["slide_id"]: int(r["fold"]) for r in csv.DictReader(open(root / "mhim" / "predictions.csv"))}["s05"]
    prob, _ = model_output(root / "mhim" / f"abmil_fold{fold}_teacher", "s05", root)
    with h5py.File(tmp_path / "t" / "attention" / "s05.h5") as fh:
        assert fh.attrs["probability"] == pytest.approx(prob, abs=1e-6)

    assert main(["predict", "--oof", str(root / "plain"), "--part", "teacher", "--features", str(root),
                 "--out", str(tmp_path / "x"), "-q"]) == 1
    assert capsys.readouterr().err.count("has no teacher") == 3  # one message per fold
    assert main(["predict", "--oof", str(tmp_path), "--features", str(root), "--out", str(tmp_path / "y")]) == 2
    assert "predictions.csv does not exist" in capsys.readouterr().err
    assert main(["predict", "--oof", str(root / "plain"), "--checkpoint", "x", "--features", str(root),
                 "--out", str(tmp_path / "y")]) == 2
    assert main(["predict", "--features", str(root), "--out", str(tmp_path / "y")]) == 2
    assert "--oof" in capsys.readouterr().err


# ---- train's report ------------------------------------------------------------------------------
def test_summary_has_the_pooled_auc_its_interval_and_small_fold_warnings(run):
    root, _ = run
    summary = json.loads((root / "plain" / "summary.json").read_text())
    rows = list(csv.DictReader(open(root / "plain" / "predictions.csv")))
    labels = np.array([int(r["label"]) for r in rows]) == 1
    probs = np.array([float(r["probability"]) for r in rows])
    assert summary["pooled_test_auc"] == pytest.approx(roc_auc(labels, probs))
    lo, hi = summary["pooled_test_auc_95ci"]
    assert 0 <= lo <= summary["pooled_test_auc"] <= hi <= 1
    assert summary["n_test_slides"] == 12 and len(summary["test_auc_per_fold"]) == 3
    assert summary["test_auc_mean"] == pytest.approx(np.mean(list(summary["test_auc_per_fold"].values())))
    assert [f["checkpoint"] for f in summary["folds"]] == ["abmil_fold0", "abmil_fold1", "abmil_fold2"]
    assert sum(f["n_test"] for f in summary["folds"]) == 12
    assert any("small test folds" in w and "fold 0 (4 slides" in w for w in summary["warnings"])


def test_cross_validation_summary_warns_only_for_small_folds():
    rng = np.random.default_rng(1)
    labels = np.tile([True, False], 30)
    probs = np.clip(labels * 0.3 + rng.random(60) * 0.7, 0, 1)
    big = cross_validation_summary(labels, probs, np.arange(60) // 30, n_boot=200)  # 2 folds of 30
    assert big["warnings"] == [] and 0 < big["pooled_test_auc_95ci"][0] < big["pooled_test_auc"]
    small = cross_validation_summary(labels, probs, np.arange(60) // 6, n_boot=200)  # 10 folds of 6
    assert len(small["test_auc_per_fold"]) == 10 and "small test folds" in small["warnings"][0]
    assert small["pooled_test_auc"] == big["pooled_test_auc"]  # pooling does not depend on the folds


def test_a_redirected_train_log_has_no_carriage_returns(tmp_path):
    labels = write_cohort(tmp_path, n=8, sizes=(20, 40))
    log = tmp_path / "train.log"
    with open(log, "w") as fh:
        result = subprocess.run([sys.executable, "-m", "napari_mil.cli", "train", str(labels), "--features",
                                 str(tmp_path), "--encoder", ENCODER, "--folds", "2", "--epochs", "3", "--out",
                                 str(tmp_path / "m")], stdout=fh, stderr=subprocess.STDOUT)
    assert result.returncode == 0, log.read_text()
    text = log.read_bytes()
    assert b"\r" not in text
    lines = text.decode().splitlines()
    assert sum(line.startswith("fold 1/2: epoch ") for line in lines) >= 1  # one line per epoch instead of a bar
    assert any(line.startswith("pooled out-of-fold test AUC") for line in lines)


# ---- TransMIL's size ----------------------------------------------------------------------------------
def test_transmil_size_from_the_command_line(tmp_path, capsys):
    labels = write_cohort(tmp_path, n=8, sizes=(20, 40))
    args = ["train", str(labels), "--features", str(tmp_path), "--encoder", ENCODER, "--folds", "2", "--epochs", "1",
            "--model", "transmil", "-q"]
    assert main([*args, "--transmil-dim", "32", "--transmil-heads", "4", "--transmil-landmarks", "8",
                 "--out", str(tmp_path / "m")]) == 0
    model, meta = load_checkpoint(tmp_path / "m" / "transmil_fold0")
    assert meta["model_cfg"] == {"dim": 32, "heads": 4, "landmarks": 8}
    assert model.fc1[0].out_features == 32 and model.layer1.attn.heads == 4 and model.layer1.attn.landmarks == 8

    assert main([*args, "--transmil-dim", "30", "--transmil-heads", "4", "--out", str(tmp_path / "x")]) == 2
    assert "dim (30) must be a multiple of its heads (4)" in capsys.readouterr().err
    assert main([*args, "--transmil-landmarks", "0", "--out", str(tmp_path / "x")]) == 2
    assert "landmarks must be a whole number of at least 1" in capsys.readouterr().err
    args[args.index("transmil")] = "abmil"
    assert main([*args, "--transmil-heads", "4", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--transmil-heads" in err and "use it with --model transmil" in err
    assert not (tmp_path / "x").exists()
