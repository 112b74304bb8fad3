"""Slide-level metrics: AUC, balanced accuracy and F1, a threshold chosen on validation data,
and stratified bootstrap confidence intervals."""

from __future__ import annotations

import numpy as np


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve by the rank-sum statistic; tied scores share their mean rank.
    NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    # average ranks over runs of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e - 1) / 2 + 1
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def choose_threshold(labels, probs) -> float:
    """The probability threshold maximising Youden's J (sensitivity + specificity - 1).
    Meant for validation data; apply the result unchanged to the test set."""
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    candidates = np.unique(probs)
    best, best_j = 0.5, -np.inf
    for t in candidates:
        pred = probs >= t
        sens = (pred & labels).sum() / max(labels.sum(), 1)
        spec = (~pred & ~labels).sum() / max((~labels).sum(), 1)
        if sens + spec - 1 > best_j:
            best, best_j = float(t), sens + spec - 1
    return best


def binary_metrics(labels, probs, threshold: float = 0.5) -> dict[str, float]:
    """AUC, balanced accuracy, F1 and accuracy of positive-class probabilities at a threshold."""
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs >= threshold
    tp, fp = int((pred & labels).sum()), int((pred & ~labels).sum())
    fn, tn = int((~pred & labels).sum()), int((~pred & ~labels).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {
        "auc": roc_auc(labels, probs),
        "balanced_accuracy": float(np.nanmean([sens, spec])),
        "f1": float(f1),
        "accuracy": float((tp + tn) / len(labels)) if len(labels) else float("nan"),
    }


def bootstrap_ci(labels, probs, threshold: float = 0.5, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals of ``binary_metrics`` by resampling slides with
    replacement within each class (so every resample has both classes)."""
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        for key, value in binary_metrics(labels[idx], probs[idx], threshold).items():
            samples.setdefault(key, []).append(value)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: (float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi))) for k, v in samples.items()}


def cross_validation_summary(labels, probs, folds, n_boot: int = 1000, min_slides: int = 10,
                             min_per_class: int = 3) -> dict:
    """The test predictions of a cross-validation, pooled and per fold.

    ``labels`` (positive or not), ``probs`` and ``folds`` (the fold of each prediction) hold one
    entry per test slide. Returns the pooled out-of-fold AUC (every test prediction in one ROC
    curve) with its stratified bootstrap 95% interval, the per-fold AUCs with their mean and sd
    (population sd, over the folds where both classes were tested), and warnings for test folds
    too small for their own AUC to mean much (fewer than ``min_slides`` slides or fewer than
    ``min_per_class`` of a class)."""
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    folds = np.asarray(folds)
    out: dict = {"n_test_slides": int(len(labels)), "n_test_positive": int(labels.sum())}
    both = 0 < labels.sum() < len(labels)
    out["pooled_test_auc"] = roc_auc(labels, probs) if both else float("nan")
    out["pooled_test_auc_95ci"] = list(bootstrap_ci(labels, probs, n_boot=n_boot)["auc"]) if both \
        else [float("nan"), float("nan")]
    per_fold, warnings, small = {}, [], []
    for k in np.unique(folds):
        pick = folds == k
        n, pos = int(pick.sum()), int(labels[pick].sum())
        per_fold[int(k)] = roc_auc(labels[pick], probs[pick])
        if n < min_slides or min(pos, n - pos) < min_per_class:
            small.append(f"fold {int(k)} ({n} slides: {pos} positive, {n - pos} negative)")
    aucs = [a for a in per_fold.values() if np.isfinite(a)]
    out["test_auc_per_fold"] = per_fold
    out["test_auc_mean"] = float(np.mean(aucs)) if aucs else float("nan")
    out["test_auc_sd"] = float(np.std(aucs)) if aucs else float("nan")
    if not both:
        warnings.append("the test predictions hold a single class: no AUC can be computed")
    if len(aucs) < len(per_fold):
        warnings.append(f"{len(per_fold) - len(aucs)} test fold(s) hold a single class and have no AUC")
    if small:
        warnings.append(f"small test folds: {'; '.join(small)}. A fold's own AUC moves a lot with one slide; "
                        f"read the pooled AUC and its interval (fewer folds make larger test folds)")
    out["warnings"] = warnings
    return out
