"""The semi-real cohort: real texture, lesions where the ground truth says, and a model that learns on it."""

import csv

import numpy as np
import pytest
from scipy import ndimage

from napari_mil.synthetic.semireal import (
    LesionStyle,
    _concentrations,
    atypia,
    make_semireal_cohort,
    make_semireal_slide,
    texture_bank,
)
from napari_mil.slide import open_slide
from napari_mil.synthetic import SyntheticSlide


@pytest.fixture(scope="module")
def lesion_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("semireal") / "pos.tif"
    return make_semireal_slide(path, width=4096, height=3072, seed=3, lesion_burden=0.2, difficulty=0.3,
                               pen_marks=True, fold=True, floaters=2)


def test_atypia_enlarges_darkens_and_crowds_nuclei():
    """Known geometry: two round nuclei of radius 4 px on pale cytoplasm."""
    h = np.full((64, 64), 0.1, np.float32)
    yy, xx = np.mgrid[:64, :64]
    for cy, cx in ((20, 20), (40, 44)):
        h[np.hypot(yy - cy, xx - cx) <= 4] = 0.8
    nuclear_area = (h > 0.45).sum()
    strong, subtle, none = (atypia(h, LesionStyle.from_difficulty(d), (9, -7)) for d in (0.0, 0.6, 1.0))
    assert (strong > 0.45).sum() > 2.5 * nuclear_area  # larger, and more of them (the shifted copy)
    assert nuclear_area < (subtle > 0.45).sum() < (strong > 0.45).sum()
    assert strong[20, 20] > 0.8 * 1.3  # hyperchromatic
    np.testing.assert_array_equal(none, h)  # difficulty 1: no change at all
    with pytest.raises(ValueError, match="difficulty"):
        LesionStyle.from_difficulty(1.5)


def test_ground_truth_is_written_and_matches_the_slide(lesion_slide):
    info = SyntheticSlide.load(lesion_slide.path)
    assert info.kind == "semireal" and info.label == 1 and info.mpp == pytest.approx(0.499)
    tissue, lesion, mimics = info.tissue_mask(), info.tumour_mask(), info.mimic_mask()
    assert tissue.shape == (3072 // 32, 4096 // 32)
    assert not (lesion & ~tissue).any() and not (mimics & lesion).any()
    assert info.tumour_fraction == pytest.approx(lesion.sum() / tissue.sum())
    assert 0.12 < info.tumour_fraction < 0.25 and info.fold and info.pen_marks
    with open_slide(info.path) as slide:
        assert slide.mpp == pytest.approx(0.499, abs=1e-3) and slide.level_count >= 2
        level0 = slide.read_level(0)[..., :3]
    # haematoxylin per mask cell: the lesion's cores are darker in nuclei than tissue away from it
    h = _concentrations(level0)[..., 0]
    cells = h[: tissue.shape[0] * 32, : tissue.shape[1] * 32].reshape(tissue.shape[0], 32, tissue.shape[1], 32)
    nuclear = (cells > 0.45).mean(axis=(1, 3))  # share of nuclear pixels per cell
    core = ndimage.binary_erosion(lesion, iterations=2)
    away = ndimage.binary_erosion(tissue, iterations=2) & ~ndimage.binary_dilation(lesion, iterations=4) & ~mimics
    assert core.sum() > 20 and nuclear[core].mean() > 1.5 * nuclear[away].mean()
    glass = ~ndimage.binary_dilation(tissue | info.artefact_mask(), iterations=2)
    assert level0[: glass.shape[0] * 32, : glass.shape[1] * 32][np.kron(glass, np.ones((32, 32), bool))].min(1).mean() > 220


def test_texture_is_real_cmu1_and_lesion_free_slides_have_no_lesion(tmp_path):
    bank = texture_bank()
    assert len(bank.dense) > 50 and len(bank.sparse) > 50
    info = make_semireal_slide(tmp_path / "neg.tif", width=2048, height=2048, seed=5, lesion_burden=0.0)
    assert info.label == 0 and not info.tumour_mask().any() and info.tissue_mask().any()


def test_same_seed_same_slide_and_the_stain_can_be_set(tmp_path):
    a = make_semireal_slide(tmp_path / "a.tif", width=1536, height=1536, seed=9, lesion_burden=0.1)
    b = make_semireal_slide(tmp_path / "b.tif", width=1536, height=1536, seed=9, lesion_burden=0.1)
    pale = make_semireal_slide(tmp_path / "c.tif", width=1536, height=1536, seed=9, lesion_burden=0.1,
                               stain={"h": 0.5, "e": 0.5, "angle": 0.0, "brightness": 1.0})
    with open_slide(a.path) as sa, open_slide(b.path) as sb, open_slide(pale.path) as sc:
        np.testing.assert_array_equal(sa.read_level(0), sb.read_level(0))
        tissue = np.kron(a.tissue_mask(), np.ones((32, 32), bool))[:1536, :1536]
        assert sc.read_level(0)[..., :3][tissue].mean() > sa.read_level(0)[..., :3][tissue].mean() + 10
    assert pale.stain == {"h": 0.5, "e": 0.5, "angle": 0.0, "brightness": 1.0}


def test_bad_parameters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="smaller than"):
        make_semireal_slide(tmp_path / "x.tif", width=512, height=512)
    with pytest.raises(ValueError, match="lesion_burden"):
        make_semireal_slide(tmp_path / "x.tif", width=2048, height=2048, lesion_burden=1.5)
    with pytest.raises(ValueError, match="difficulty"):
        make_semireal_slide(tmp_path / "x.tif", width=2048, height=2048, difficulty=float("nan"))


@pytest.mark.slow
def test_a_short_training_on_a_small_semireal_cohort_learns_where_the_lesions_are(tmp_path):
    """ABMIL with the trainer's defaults, on 16 small semi-real slides: on held-out positive slides
    its attention ranks lesion patches above the rest far better than chance (0.5)."""
    from napari_mil.encoders import create_encoder
    from napari_mil.features.extract import extract_features
    from napari_mil.tiling import make_patch_grid, tissue_fractions
    from napari_mil.tissue import TissueMask, detect_tissue
    from napari_mil.training.data import Bag, patient_folds
    from napari_mil.training.metrics import roc_auc
    from napari_mil.training.trainer import TrainConfig, train

    labels_csv = make_semireal_cohort(tmp_path, n_slides=16, seed=2, width=3072, height=2560, difficulty=0.4,
                                      burden_range=(0.08, 0.3))
    rows = list(csv.DictReader(open(labels_csv)))
    assert len(rows) == 16 and {r["label"] for r in rows} == {"0", "1"}
    encoder = create_encoder("hne_stats", device="cpu")
    bags, lesion = [], []
    for r in rows:
        with open_slide(tmp_path / r["path"]) as slide:
            grid = make_patch_grid(slide, detect_tissue(slide), magnification=20, min_tissue=0.5)
        bag = extract_features(tmp_path / r["path"], grid, encoder, tmp_path / "features", num_workers=0).bag
        info = SyntheticSlide.load(tmp_path / r["path"])
        lesion.append(tissue_fractions(TissueMask(info.tumour_mask(), (32, 32)), bag.coords, grid.patch_size_level0))
        bags.append(Bag(r["slide_id"], int(r["label"]), r["patient_id"], bag.features.astype(np.float32), bag.coords))
    fold = patient_folds(bags, k=4, seed=0)[0]
    result = train([bags[i] for i in fold["train"]], [bags[i] for i in fold["val"]],
                   TrainConfig(epochs=20, min_epochs=10, seed=0, device="cpu"))
    assert not result.warnings
    import torch

    aucs = []
    result.model.eval()
    with torch.no_grad():
        for i in np.concatenate([fold["test"], fold["val"]]):
            if bags[i].label and (lesion[i] >= 0.5).any() and (lesion[i] < 0.5).any():
                attention = result.model(torch.from_numpy(bags[i].features)[None]).attention[0].numpy()
                aucs.append(roc_auc(lesion[i] >= 0.5, attention))
    assert len(aucs) >= 2 and np.mean(aucs) > 0.8, aucs
