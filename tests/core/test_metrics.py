"""Slide-level metrics against hand-computed values."""

import numpy as np
import pytest

from napari_mil.training.metrics import binary_metrics, bootstrap_ci, choose_threshold, roc_auc


def test_auc_hand_cases():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    # 2 positives x 3 negatives = 6 pairs: wins 1 + 1 + 1 (0.6 vs 0.4, 0.3, 0.6 tie = 0.5) ...
    labels, scores = [1, 1, 0, 0, 0], [0.6, 0.3, 0.4, 0.2, 0.6]
    pairs = [(p, n) for p, l in zip(scores, labels) if l for n, m in zip(scores, labels) if not m]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(labels, scores) == pytest.approx(expected)
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_threshold_is_chosen_on_validation_and_applied_to_test():
    val_labels, val_probs = [0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.35, 0.3, 0.6, 0.9]
    t = choose_threshold(val_labels, val_probs)
    assert t == pytest.approx(0.3)  # Youden's J ties at 0.3 and 0.6 (2/3 each); the lower wins
    m = binary_metrics([0, 1, 1, 0], [0.2, 0.7, 0.65, 0.5], threshold=t)
    # on test, 0.5 >= 0.3 is a false positive: sensitivity 1, specificity 1/2
    assert m["balanced_accuracy"] == pytest.approx(0.75) and m["f1"] == pytest.approx(0.8) and m["auc"] == 1.0


def test_balanced_accuracy_and_f1_by_hand():
    labels = [1, 1, 1, 1, 0, 0]
    probs = [0.9, 0.8, 0.4, 0.3, 0.6, 0.1]  # at 0.5: tp 2, fn 2, fp 1, tn 1
    m = binary_metrics(labels, probs, 0.5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_data():
    rng = np.random.default_rng(0)

    def sample(n):
        labels = rng.integers(0, 2, n)
        return labels, np.clip(labels * 0.3 + rng.normal(0.35, 0.2, n), 0, 1)

    small = sample(40)
    large = sample(400)
    ci_small = bootstrap_ci(*small, n_boot=300)["auc"]
    ci_large = bootstrap_ci(*large, n_boot=300)["auc"]
    assert ci_small[0] <= roc_auc(*small) <= ci_small[1]
    assert ci_large[1] - ci_large[0] < ci_small[1] - ci_small[0]
