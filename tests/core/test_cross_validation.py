"""The cross-validation use case that ``napari-mil train`` and the Retrain dock both run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from napari_mil.errors import NapariMilError
from napari_mil.training.data import Bag, SlideRecord
from napari_mil.training.trainer import TrainConfig, TrainingCancelled
from napari_mil.usecases.cross_validation import FoldError, cross_validate, make_folds


def _cohort(n: int = 20, seed: int = 0):
    """Bags whose positives carry a few shifted instances: learnable, not trivial to a mean."""
    rng = np.random.default_rng(seed)
    bags, records = [], []
    for i in range(n):
        label = i % 2
        x = rng.normal(size=(12, 6)).astype(np.float32)
        if label:
            x[:3, 0] += 3.0
        bags.append(Bag(f"s{i:02d}", label, f"p{i // 2:02d}", x, np.stack([np.arange(12) * 256, np.zeros(12)], 1)))
        records.append(SlideRecord(f"s{i:02d}", label, f"p{i // 2:02d}"))
    return records, bags


def _quick(**kw) -> TrainConfig:
    return TrainConfig(epochs=6, min_epochs=2, patience=3, device="cpu", **kw)


def test_every_slide_is_tested_once_by_the_fold_that_held_it_out(tmp_path):
    records, bags = _cohort()
    folds = make_folds(records, bags, k=4, seed=3)
    epochs: list[int] = []
    cv = cross_validate(bags, folds, _quick(), tmp_path, on_epoch=lambda k, r: epochs.append(k), n_boot=50)
    assert len(cv.folds) == 4 and not cv.single_split
    assert sorted(r["slide_id"] for r in cv.rows) == sorted(b.slide_id for b in bags)
    for fold, split in zip(cv.folds, folds):
        assert set(fold.test_slide_ids) == {bags[i].slide_id for i in split["test"]}
        assert fold.result.checkpoint == tmp_path / f"abmil_fold{fold.fold}"
    assert cv.fold_of("s05") == next(f.fold for f in cv.folds if "s05" in f.test_slide_ids)
    assert cv.fold_of("not-a-slide") is None
    assert sorted(set(epochs)) == [0, 1, 2, 3]
    with open(tmp_path / "predictions.csv", newline="") as fh:
        written = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in written] == [r["slide_id"] for r in cv.rows]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2, 3]
    assert summary["n_test_slides"] == len(bags)
    assert 0.0 <= summary["pooled_test_auc"] <= 1.0


def test_the_same_seed_gives_the_same_folds_and_predictions(tmp_path):
    records, bags = _cohort()
    first = cross_validate(bags, make_folds(records, bags, k=2, seed=1), _quick(seed=2), tmp_path / "a", n_boot=10)
    again = cross_validate(bags, make_folds(records, bags, k=2, seed=1), _quick(seed=2), tmp_path / "b", n_boot=10)
    assert first.rows == again.rows


def test_a_split_column_is_one_split_with_its_own_test_set(tmp_path):
    records, bags = _cohort(12)
    for i, r in enumerate(records):
        r.split = ("train", "train", "val", "test")[i % 4]
    folds = make_folds(records, bags, k=5)
    assert len(folds) == 1
    cv = cross_validate(bags, folds, _quick(), tmp_path, n_boot=10)
    assert cv.single_split
    assert sorted(r["slide_id"] for r in cv.rows) == [r.slide_id for r in records if r.split == "test"]


def test_fewer_than_two_folds_is_refused():
    records, bags = _cohort(8)
    with pytest.raises(NapariMilError, match="at least 2 folds"):
        make_folds(records, bags, k=1)


def test_a_failing_fold_is_named_and_a_cancel_is_not_a_fold_error(tmp_path):
    records, bags = _cohort(12)
    folds = make_folds(records, bags, k=3)
    with pytest.raises(FoldError, match="^fold 1: "):
        cross_validate(bags, folds, _quick(model="no_such_model"), tmp_path, n_boot=10)
    with pytest.raises(TrainingCancelled):
        cross_validate(bags, folds, _quick(), tmp_path, cancel=lambda: True, n_boot=10)
    assert not (tmp_path / "summary.json").exists()  # nothing claims a finished run
