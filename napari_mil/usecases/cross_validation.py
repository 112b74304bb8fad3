"""Cross-validated training with out-of-fold test predictions: what ``napari-mil train`` and the
Retrain dock both run, so that they cannot train differently.

    folds = make_folds(records, bags, k=5, seed=0)   # the CSV's own split, or patient-level folds
    cv = cross_validate(bags, folds, TrainConfig(...), out)

For each fold, ``train`` runs on the fold's train bags with early stopping and the threshold
chosen on its validation bags; the fold's checkpoint is ``<out>/<model>_fold<k>``, and its test
bags are predicted with it. ``<out>/predictions.csv`` gets one row per test slide (its fold,
label, probability and the class at the validation threshold), and ``<out>/summary.json`` the
per-fold validation and test figures with the pooled out-of-fold test AUC and its bootstrap CI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_mil.atomic import write_csv, write_json
from napari_mil.errors import NapariMilError
from napari_mil.training.data import Bag, SlideRecord, patient_folds
from napari_mil.training.metrics import binary_metrics, cross_validation_summary
from napari_mil.training.trainer import (
    EpochReport,
    TrainConfig,
    TrainingCancelled,
    TrainResult,
    mhim_bag_size_warnings,
    predict_probs,
    train,
)

SPLITS = ("train", "val", "test")


class FoldError(NapariMilError):
    """A fold whose training failed; the message names the fold (counted from 1)."""

    def __init__(self, fold: int, error: NapariMilError):
        super().__init__(f"fold {fold + 1}: {error}")
        self.fold, self.error = fold, error


@dataclass
class FoldResult:
    fold: int  # counted from 0, as in the checkpoint names and predictions.csv
    result: TrainResult
    test_slide_ids: list[str]
    test_metrics: dict  # binary_metrics of the test bags at the validation threshold; {} without test bags
    warnings: list[str]  # the fold's own warnings (the bag-size warnings of MHIM-MIL are said once, up front)


@dataclass
class CrossValidationResult:
    folds: list[FoldResult] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # the out-of-fold test predictions, as predictions.csv
    summary: dict = field(default_factory=dict)  # as summary.json

    @property
    def single_split(self) -> bool:
        """Whether the user gave the split (the CSV's split column) instead of folds."""
        return len(self.folds) == 1

    def fold_of(self, slide_id: str) -> int | None:
        """The fold whose test set held ``slide_id`` out (None when it was no test slide)."""
        return next((f.fold for f in self.folds if slide_id in f.test_slide_ids), None)


def make_folds(records: list[SlideRecord], bags: list[Bag], k: int = 5, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """The CSV's own train/val/test split when every slide has one, else patient-level
    stratified ``k`` folds (``patient_folds``): a list of {split: indices into ``bags``}."""
    if all(r.split for r in records):
        return [{name: np.array([i for i, r in enumerate(records) if r.split == name], int) for name in SPLITS}]
    if k < 2:
        raise NapariMilError(f"cross-validation needs at least 2 folds, not {k}; or give the CSV a split column")
    return patient_folds(bags, k, seed)


def cross_validate(bags: list[Bag], folds: list[dict[str, np.ndarray]], cfg: TrainConfig, out: str | Path, *,
                   extra_meta: dict | None = None,
                   on_epoch: Callable[[int, EpochReport], None] | None = None,
                   on_start: Callable[[int, object, object], None] | None = None,
                   on_fold: Callable[[FoldResult], None] | None = None,
                   cancel: Callable[[], bool] | None = None, n_boot: int = 1000) -> CrossValidationResult:
    """Train every fold, predict its test bags, and write the checkpoints, predictions.csv and
    summary.json under ``out``. ``on_epoch(fold, report)`` follows training, ``on_start(fold,
    model, mhim)`` gets each fold's model before its first epoch (for live maps), and
    ``on_fold(fold_result)`` each finished fold. A fold that fails raises ``FoldError``; a
    cancel raises ``TrainingCancelled`` (the best checkpoint of the fold under way is kept)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    positive = max(b.label for b in bags)
    cv = CrossValidationResult(summary={"folds": []})
    for k, fold in enumerate(folds):
        pick = {name: [bags[i] for i in fold.get(name, [])] for name in SPLITS}
        try:
            result = train(pick["train"], pick["val"], cfg, checkpoint=out / f"{cfg.model}_fold{k}",
                           on_epoch=None if on_epoch is None else (lambda r, k=k: on_epoch(k, r)),
                           cancel=cancel, extra_meta=extra_meta,
                           on_start=None if on_start is None else (lambda m, h, k=k: on_start(k, m, h)))
        except TrainingCancelled:
            raise
        except NapariMilError as exc:
            raise FoldError(k, exc) from exc
        said = mhim_bag_size_warnings(cfg.mhim, pick["train"]) if cfg.mhim is not None else []
        own = [w for w in result.warnings + (result.baseline.warnings if result.baseline else []) if w not in said]
        test = pick["test"]
        metrics: dict = {}
        if test:
            probs, _ = predict_probs(result.model, test, next(result.model.parameters()).device)
            bad = [b.slide_id for b, p in zip(test, probs[:, -1]) if not np.isfinite(p)]
            if bad:  # never a class: predictions.csv would say 0
                raise FoldError(k, NapariMilError(f"the model gives NaN or infinite probabilities for test slide(s) "
                                                  f"{', '.join(bad[:5])}; check their features"))
            for bag, p in zip(test, probs[:, -1]):
                cv.rows.append({"slide_id": bag.slide_id, "patient_id": bag.patient_id, "fold": k, "label": bag.label,
                                "probability": f"{p:.6f}", "predicted": int(p >= result.threshold)})
            metrics = binary_metrics(np.array([b.label for b in test]) == positive, probs[:, -1], result.threshold)
        done = FoldResult(k, result, [b.slide_id for b in test], metrics, own)
        cv.folds.append(done)
        cv.summary["folds"].append({
            "fold": k, "checkpoint": result.checkpoint.name, "best_epoch": result.best_epoch,
            "threshold": result.threshold, "n_test": len(test),
            "n_test_by_class": [sum(b.label == c for b in test) for c in range(positive + 1)],
            "val": result.val_metrics, "test": metrics, "warnings": result.warnings})
        if on_fold is not None:
            on_fold(done)
    if cv.rows:
        labels = np.array([r["label"] for r in cv.rows]) == positive
        probs = np.array([float(r["probability"]) for r in cv.rows])
        cv.summary.update(cross_validation_summary(labels, probs, [r["fold"] for r in cv.rows], n_boot=n_boot))
        write_csv(out / "predictions.csv", cv.rows)
    write_json(out / "summary.json", cv.summary)
    return cv
