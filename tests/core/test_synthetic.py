"""The synthetic slide generator: readable pyramids with faithful ground truth."""

import csv

import numpy as np
import pytest

from napari_mil.slide import open_slide
from napari_mil.synthetic import SyntheticSlide, make_cohort, make_synthetic_slide


def test_ground_truth_matches_the_pixels(synthetic_slide):
    info = SyntheticSlide.load(synthetic_slide.path)
    assert info.label == 1 and info.tumour_fraction == pytest.approx(0.2, abs=0.02)
    tissue, tumour = info.tissue_mask(), info.tumour_mask()
    assert tissue.shape == (6144 // 32, 8192 // 32)
    assert not (tumour & ~tissue).any()
    with open_slide(info.path) as slide:
        thumb = slide.read_level(2).astype(float)  # 16x downsample: 2 px per mask pixel
    thumb = thumb.reshape(thumb.shape[0] // 2, 2, thumb.shape[1] // 2, 2, 3).mean(axis=(1, 3))
    inner_tumour = tumour & ~np.roll(~tumour, 1, 0) & ~np.roll(~tumour, -1, 0) & ~np.roll(~tumour, 1, 1) & ~np.roll(~tumour, -1, 1)
    stroma = tissue & ~tumour
    glass = ~tissue & ~info.artefact_mask()
    # tumour is darker and more purple than stroma; glass is bright
    assert thumb[inner_tumour].mean() < thumb[stroma].mean() - 25
    assert thumb[glass].min(axis=1).mean() > 225


def test_tumour_free_slide(tmp_path):
    info = make_synthetic_slide(tmp_path / "neg.tif", width=2048, height=2048, seed=1, tumour_burden=0.0)
    assert info.label == 0 and info.tumour_fraction == 0 and not info.tumour_mask().any()
    assert info.tissue_mask().any()


def test_rare_tiny_lesion(tmp_path):
    info = make_synthetic_slide(tmp_path / "tiny.tif", width=8192, height=6144, seed=4, tumour_burden=0.004)
    tumour = info.tumour_mask()
    assert info.label == 1 and 0 < info.tumour_fraction < 0.01
    from scipy import ndimage

    assert ndimage.label(tumour)[1] == 1  # one focus


def test_same_seed_same_slide(tmp_path):
    a = make_synthetic_slide(tmp_path / "a.tif", width=2048, height=1536, seed=9)
    b = make_synthetic_slide(tmp_path / "b.tif", width=2048, height=1536, seed=9)
    with open_slide(a.path) as sa, open_slide(b.path) as sb:
        np.testing.assert_array_equal(sa.read_level(0), sb.read_level(0))


def test_cohort_is_labelled_and_paired_by_patient(tmp_path):
    csv_path = make_cohort(tmp_path, n_slides=6, seed=1, width=2048, height=1536)
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 6 and {r["label"] for r in rows} == {"0", "1"}
    for r in rows:
        info = SyntheticSlide.load(tmp_path / r["path"])
        assert int(r["label"]) == info.label
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add(r["label"])
    assert all(len(labels) == 1 for labels in by_patient.values())
    assert len(by_patient) == 4  # 3 positives and 3 negatives: two patients of each


def test_too_small_for_a_tile(tmp_path):
    with pytest.raises(ValueError, match="smaller than one"):
        make_synthetic_slide(tmp_path / "x.tif", width=100, height=100)
