"""The semi-real benchmark cohort and its reference figures, shared by the benchmarks.

    .venv/bin/python benchmarks/semireal_data.py [--slides 60] [--difficulty 0.5] [--seeds 3]

prints the calibration figures of a cohort (napari_mil.synthetic.semireal): the patch-level ceiling, a
colour-only baseline and mean-pooled features with logistic regression, each over patient-level
5-fold cross-validation repeated for each seed (mean ± sd over seeds of the pooled
out-of-fold AUC).

Protocol. The cohort (half lesion-free, lesion burden log-uniform from 1% to 30% of the
tissue, two slides per patient) is generated once and cached, tiled at 20x in 256 px patches
(tissue detection with the defaults, min tissue 0.5) and encoded with the default encoder.
A patch is a lesion patch when the ground-truth lesion covers at least half of it.
- Patch ceiling: logistic regression on the patch features (standardised on the training
  folds' patches), trained with the lesion labels of the training folds' patches (lesion
  patches against every patch of lesion-free slides); AUC over the test folds' patches of
  the same kinds. Its slide AUC: each test slide scored by its highest patch score (a
  supervised ceiling for slide classification).
- Colour-only: logistic regression of each slide's mean and standard deviation of the patch
  RGB means (6 numbers), slide AUC.
- Mean-pool + LR: logistic regression of the mean of each slide's standardised features.
Logistic regression: L2 penalty 1e-2, L-BFGS in torch, inputs standardised on the training
folds.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("NAPARI_MIL_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))
RGB_MEAN = slice(15, 18)  # hne_stats: the patch's mean R, G, B


def cohort(n_slides: int = 60, difficulty: float = 0.5, seed: int = 0, log=print) -> list[dict]:
    from napari_mil.synthetic.semireal import make_semireal_cohort

    folder = CACHE / f"semireal_{n_slides}_d{difficulty:g}_s{seed}"
    t = time.perf_counter()
    csv_path = make_semireal_cohort(folder, n_slides=n_slides, seed=seed, difficulty=difficulty)
    log(f"cohort: {n_slides} slides in {folder.name} ({time.perf_counter() - t:.0f} s)")
    rows = list(csv.DictReader(open(csv_path)))
    for r in rows:
        r["path"] = str(folder / r["path"])
    return rows


def bags(rows: list[dict], encoder_name: str = "hne_stats", log=print):
    """Training bags (napari_mil.training.data.Bag) and per-patch lesion fractions."""
    from napari_mil.encoders import create_encoder
    from napari_mil.features.extract import extract_features
    from napari_mil.slide import open_slide
    from napari_mil.synthetic import SyntheticSlide
    from napari_mil.tiling import make_patch_grid, tissue_fractions
    from napari_mil.tissue import TissueMask, detect_tissue
    from napari_mil.training.data import Bag

    encoder = create_encoder(encoder_name, device="cpu")
    root = Path(rows[0]["path"]).parent / "features"
    out, lesion, t = [], [], time.perf_counter()
    for r in rows:
        with open_slide(r["path"]) as slide:
            grid = make_patch_grid(slide, detect_tissue(slide), patch_size=256, magnification=20, min_tissue=0.5)
        bag = extract_features(r["path"], grid, encoder, root, num_workers=0).bag
        info = SyntheticSlide.load(r["path"])
        fractions = tissue_fractions(TissueMask(info.tumour_mask(), (info.mask_downsample,) * 2), bag.coords,
                                     grid.patch_size_level0)
        out.append(Bag(r["slide_id"], int(r["label"]), r["patient_id"], bag.features.astype(np.float32), bag.coords))
        lesion.append(fractions)
    sizes = [len(b.features) for b in out]
    log(f"features: {sum(sizes)} patches, {min(sizes)}-{max(sizes)} a slide ({time.perf_counter() - t:.0f} s)")
    return out, lesion


def logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-2):
    """Standardised L2 logistic regression; returns a function giving probabilities."""
    import torch

    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy(((x - mean) / std).astype(np.float32))
    yt = torch.from_numpy(y.astype(np.float32))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach().numpy(), float(b.detach())

    def predict(z: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(((z - mean) / std) @ w + b)))

    return predict


def reference_figures(all_bags, lesion, folds) -> dict[str, float]:
    """Pooled out-of-fold AUCs of the three references for one set of folds."""
    from napari_mil.training.metrics import roc_auc

    labels = np.array([b.label for b in all_bags])
    slide_colour = np.stack([np.concatenate([b.features[:, RGB_MEAN].mean(0), b.features[:, RGB_MEAN].std(0)])
                             for b in all_bags])
    colour, pooled, top_patch = np.zeros(len(all_bags)), np.zeros(len(all_bags)), np.zeros(len(all_bags))
    patch_scores, patch_labels = [], []
    for fold in folds:
        train = np.concatenate([fold["train"], fold["val"]])
        test = fold["test"]
        colour[test] = logistic_fit(slide_colour[train], labels[train])(slide_colour[test])
        stacked = np.concatenate([all_bags[i].features for i in train])
        mean, std = stacked.mean(0), stacked.std(0) + 1e-6
        pooled_x = np.stack([((b.features - mean) / std).mean(0) for b in all_bags])
        pooled[test] = logistic_fit(pooled_x[train], labels[train])(pooled_x[test])

        def patches(index):
            xs, ys = [], []
            for i in index:
                keep = lesion[i] >= 0.5 if labels[i] else np.ones(len(lesion[i]), bool)
                xs.append(all_bags[i].features[keep])
                ys.append(np.full(int(keep.sum()), labels[i]))
            return np.concatenate(xs), np.concatenate(ys)

        xtr, ytr = patches(train)
        xte, yte = patches(test)
        patch_model = logistic_fit(xtr, ytr)
        patch_scores.append(patch_model(xte))
        patch_labels.append(yte)
        for i in test:  # the supervised slide ceiling: a slide scored by its most lesion-like patch
            top_patch[i] = patch_model(all_bags[i].features).max()
    return {"patch_ceiling_auc": roc_auc(np.concatenate(patch_labels), np.concatenate(patch_scores)),
            "patch_ceiling_slide_auc": roc_auc(labels, top_patch),
            "colour_only_auc": roc_auc(labels, colour), "mean_pool_lr_auc": roc_auc(labels, pooled)}


def main() -> None:
    from napari_mil.training.data import patient_folds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=60)
    parser.add_argument("--difficulty", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    rows = cohort(args.slides, args.difficulty)
    all_bags, lesion = bags(rows)
    burden = [float(f.mean()) for f, b in zip(lesion, all_bags) if b.label]
    print(f"positive slides: lesion patches {np.percentile(burden, [0, 50, 100]).round(3)} of the bag (min, median, max)")
    figures = [reference_figures(all_bags, lesion, patient_folds(all_bags, args.folds, seed)) for seed in range(args.seeds)]
    for key in figures[0]:
        values = [f[key] for f in figures]
        print(f"{key:20s} {np.mean(values):.3f} ± {np.std(values):.3f}")


if __name__ == "__main__":
    main()


# ---- MIL models through the project's trainer ---------------------------------------------------
def localisation_auc(bag_list, attention, lesion) -> list[float]:
    """Per positive slide with both kinds of patch: AUC of the attention against lesion patches
    (lesion fraction >= 0.5)."""
    from napari_mil.training.metrics import roc_auc

    return [roc_auc(f >= 0.5, a) for b, a, f in zip(bag_list, attention, lesion)
            if b.label == 1 and (f >= 0.5).any() and (f < 0.5).any()]


def attention_and_probs(model, bag_list):
    import torch

    model.eval()
    probs, attention = [], []
    with torch.no_grad():
        for b in bag_list:
            out = model(torch.from_numpy(b.features)[None])
            probs.append(torch.softmax(out.logits.float(), 1)[0, -1].item())
            attention.append(out.attention[0].numpy())
    return np.array(probs), attention


def cross_validate(all_bags, lesion, folds, cfg, extra=None) -> dict:
    """Out-of-fold test probabilities and attention of ``napari_mil.training.trainer.train`` with
    ``cfg`` over the folds; pooled slide AUC, per-fold AUCs and mean localisation. ``extra(result,
    fold, test_bags, test_lesion)`` may add per-fold numbers (a dict of lists is returned)."""
    from napari_mil.training.metrics import roc_auc
    from napari_mil.training.trainer import train

    probs = np.full(len(all_bags), np.nan)
    loc, fold_auc, added, seconds, warnings_ = [], [], {}, 0.0, 0
    for fold in folds:
        pick = {k: [all_bags[i] for i in fold[k]] for k in ("train", "val", "test")}
        t = time.perf_counter()
        result = train(pick["train"], pick["val"], cfg)
        seconds += time.perf_counter() - t
        warnings_ += bool(result.warnings)
        p, att = attention_and_probs(result.model, pick["test"])
        probs[fold["test"]] = p
        test_lesion = [lesion[i] for i in fold["test"]]
        loc += localisation_auc(pick["test"], att, test_lesion)
        fold_auc.append(roc_auc([b.label for b in pick["test"]], p))
        if extra is not None:
            for key, value in extra(result, fold, pick["test"], test_lesion).items():
                added.setdefault(key, []).append(value)
    labels = np.array([b.label for b in all_bags])
    return {"auc": roc_auc(labels, probs), "fold_aucs": fold_auc, "localisation": float(np.mean(loc)),
            "probs": probs, "seconds": seconds, "warned_folds": warnings_, **added}
