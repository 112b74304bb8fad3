"""MIL models on the synthetic cohort: every model, with and without MHIM, through the project trainer.

    .venv/bin/python benchmarks/bench_synthetic_cohort.py [--slides 60] [--folds 5] [--models abmil,...] [--quick]

Protocol. A synthetic cohort (half tumour-free, tumour burden log-uniform from 0.3% to 40% of
the tissue, two slides per patient; generated and cached as in bench_default_encoder.py) is
tiled at 20x in 256 px patches and encoded with the default encoder, hne_stats (38-d).
Patient-level stratified k-fold cross-validation (napari_mil.training.data.patient_folds): in
each fold the test patients are held out and a stratified fifth of the other patients
validates. Every model is trained by napari_mil.training.trainer.train with Adam, lr 5e-4,
weight decay 1e-4, class-weighted cross-entropy, up to 40 epochs with early stopping on
validation loss (patience 8), the best epoch's weights kept and the decision threshold chosen
on validation (Youden's J); plainly, and in MHIM-MIL mode with the official Camelyon16 preset
(camelyon16_transmil for TransMIL, camelyon16_abmil for the others) twice: with the teacher
initialised from the plain model of the same fold (the official recipe's teacher_init; its
init_stu_type=fc is not reproduced) and with the trainer's default teacher, a copy of the
freshly initialised student. Features are standardised with the training bags' statistics
(one extra row trains ABMIL on the raw features). Model sizes for 38-d features: ABMIL and
gated ABMIL 64-d embedding and attention, Extreme ABMIL a frozen random 128-d V, mean/max
pooling 64-d embedding, TransMIL 128-d, 4 heads, 64 landmarks. Extreme ABMIL is also scored
with its classifier refitted in closed form (fit_classifier_ridge, ridge 1e-2, on the training
bags) after the trainer has fitted w. Reported per configuration, mean ± sd over folds: test
slide AUC, balanced accuracy at the validation threshold, attention localisation AUC (per
positive test slide with both kinds of patch, the model's attention against patches whose
ground-truth tumour fraction is >= 0.5; mean over slides, then over folds; TransMIL's
attention is the class-token row of its second layer), training seconds per fold and, for
MHIM, the share of the tumour patches of positive training slides that the teacher masks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODEL_CFG = {
    "abmil": {"embed_dim": 64, "attn_dim": 64},
    "abmil_gated": {"embed_dim": 64, "attn_dim": 64},
    "extreme_abmil": {"attn_dim": 128},
    "transmil": {"dim": 128, "heads": 4, "landmarks": 64},
    "mean_pool": {"embed_dim": 64},
    "max_pool": {"embed_dim": 64},
}
MHIM_PRESET = {"transmil": "camelyon16_transmil"}  # the others: camelyon16_abmil


def load_bags(n_slides: int):
    """Bags (napari_mil.training.data.Bag) and per-patch ground-truth tumour fractions."""
    from bench_default_encoder import CACHE, bags_for, cohort

    from napari_mil.training.data import Bag

    rows = cohort(n_slides)
    raw, seconds = bags_for(rows, "hne_stats", CACHE / f"cohort_{n_slides}" / "features")
    bags = [Bag(r["slide_id"], b["label"], b["patient"], b["features"], b["coords"]) for r, b in zip(rows, raw)]
    return bags, [b["tumour"] for b in raw], seconds


def standardised(bags, train_bags):
    from napari_mil.training.data import Bag

    stacked = np.concatenate([b.features for b in train_bags])
    mean, std = stacked.mean(0), stacked.std(0) + 1e-6
    return [Bag(b.slide_id, b.label, b.patient_id, ((b.features - mean) / std).astype(np.float32), b.coords) for b in bags]


def predict(model, bags):
    """Positive-class probabilities and per-instance attention of each bag."""
    probs, attention = [], []
    model.eval()
    with torch.no_grad():
        for b in bags:
            out = model(torch.from_numpy(b.features)[None])
            probs.append(torch.softmax(out.logits, 1)[0, 1].item())
            attention.append(out.attention[0].numpy())
    return np.array(probs), attention


def localisation(bags, attention, tumour) -> float:
    """Mean attention AUC over the positive bags that have patches with and without tumour."""
    from napari_mil.training.metrics import roc_auc

    aucs = [roc_auc(t >= 0.5, a) for b, a, t in zip(bags, attention, tumour)
            if b.label == 1 and (t >= 0.5).any() and (t < 0.5).any()]
    return float(np.mean(aucs)) if aucs else float("nan")


def tumour_masked(mhim, bags, tumour) -> float:
    """Share of the tumour patches (fraction >= 0.5) of positive bags that the teacher's masks
    hide, at the initial high-attention ratio."""
    from napari_mil.training.mhim import select_masks

    shares, generator = [], torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b, t in zip(bags, tumour):
            if b.label == 1 and (t >= 0.5).any():
                attention = mhim.teacher(torch.from_numpy(b.features)[None]).attention[0]
                masked = select_masks(attention, mhim.cfg, generator=generator).masked.numpy()
                shares.append(masked[t >= 0.5].mean())
    return float(np.mean(shares))


def run_fold(bags, tumour, fold, name, mhim, standardise, args, seed, baseline: Path) -> list[dict]:
    """Train one configuration on one fold; one result row (two for Extreme ABMIL: + ridge).
    ``mhim``: None, "baseline" (teacher from the checkpoint ``baseline``, which a plain run
    writes) or "fresh" (the trainer's default teacher)."""
    from napari_mil.training.metrics import binary_metrics, choose_threshold
    from napari_mil.training.mhim import preset
    from napari_mil.training.checkpoints import save_checkpoint
    from napari_mil.training.trainer import TrainConfig, train

    if standardise:
        bags = standardised(bags, [bags[i] for i in fold["train"]])
    split = {k: [bags[i] for i in fold[k]] for k in ("train", "val", "test")}
    test_tumour = [tumour[i] for i in fold["test"]]
    test_labels = np.array([b.label for b in split["test"]])
    cfg = TrainConfig(model=name, model_cfg=MODEL_CFG[name], epochs=args.epochs, lr=5e-4, weight_decay=1e-4,
                      patience=args.patience, seed=seed, device="cpu",
                      mhim=preset(MHIM_PRESET.get(name, "camelyon16_abmil")) if mhim else None,
                      teacher_init=str(baseline) if mhim == "baseline" else None)
    t = time.perf_counter()
    result = train(split["train"], split["val"], cfg)
    seconds = time.perf_counter() - t
    if mhim is None and standardise:  # saved after the clock stops: the MHIM runs' teacher_init
        save_checkpoint(baseline, result.model, {"model": name, "model_cfg": MODEL_CFG[name],
                                                 "in_dim": bags[0].features.shape[1], "n_classes": 2})
    probs, attention = predict(result.model, split["test"])
    rows = [{"auc": binary_metrics(test_labels, probs)["auc"],
             "localisation_auc": localisation(split["test"], attention, test_tumour),
             "balanced_accuracy": binary_metrics(test_labels, probs, result.threshold)["balanced_accuracy"],
             "seconds": seconds, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
             "masked_share": float(np.mean([h.mask_ratio for h in result.history])),
             "tumour_masked": tumour_masked(result.mhim, split["train"], [tumour[i] for i in fold["train"]]) if mhim else 0.0}]
    if name == "extreme_abmil" and not mhim:  # refit the classifier in closed form for the trained w
        model = result.model
        t = time.perf_counter()
        model.fit_classifier_ridge([torch.from_numpy(b.features) for b in split["train"]],
                                   torch.tensor([b.label for b in split["train"]]))
        ridge_seconds = time.perf_counter() - t
        threshold = choose_threshold([b.label for b in split["val"]], predict(model, split["val"])[0])
        probs, _ = predict(model, split["test"])  # the attention, hence localisation, is unchanged
        rows.append({**rows[0], "auc": binary_metrics(test_labels, probs)["auc"],
                     "balanced_accuracy": binary_metrics(test_labels, probs, threshold)["balanced_accuracy"],
                     "ridge_seconds": ridge_seconds})
    return rows


def summarise(label: str, name: str, mhim: str | None, standardise: bool, folds: list[dict]) -> dict:
    out = {"config": label, "model": name, "mhim": MHIM_PRESET.get(name, "camelyon16_abmil") if mhim else None,
           "teacher": mhim, "standardised": standardise, "model_cfg": MODEL_CFG[name], "folds": folds}
    for key in ("auc", "localisation_auc", "balanced_accuracy", "seconds", "ridge_seconds", "best_epoch", "masked_share",
                "tumour_masked"):
        if key in folds[0]:
            values = np.array([f[key] for f in folds], float)
            out[f"{key}_mean"], out[f"{key}_sd"] = round(float(np.nanmean(values)), 4), round(float(np.nanstd(values)), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=60)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODEL_CFG))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 slides, 2 folds, 3 epochs")
    args = parser.parse_args()
    if args.quick:
        args.slides, args.folds, args.epochs, args.patience = 20, 2, 3, 2
    from bench_slide_to_tiles import machine

    from napari_mil.models import create_model, parameter_counts
    from napari_mil.training.data import patient_folds
    from napari_mil.training.trainer import TrainConfig, train

    torch.set_num_threads(1)  # ~100-instance bags: a second thread only adds overhead
    t_start = time.perf_counter()
    bags, tumour, extract_s = load_bags(args.slides)
    folds = patient_folds(bags, args.folds, seed=args.seed)
    print(f"cohort: {len(bags)} slides ({sum(b.label for b in bags)} with tumour), {sum(len(b.features) for b in bags)} "
          f"patches, {len(folds)} folds (test {len(folds[0]['test'])}, val {len(folds[0]['val'])}, train "
          f"{len(folds[0]['train'])} slides in fold 1); features {extract_s:.0f} s", flush=True)
    # the first training call pays one-off costs (lazy imports, allocator warm-up): not a model's time
    train([bags[i] for i in folds[0]["train"]], [bags[i] for i in folds[0]["val"]], TrainConfig(epochs=1, device="cpu"))
    models = args.models.split(",")
    configs = [(m, mhim, True) for m in models for mhim in (None, "baseline", "fresh")]
    if "abmil" in models:
        configs.append(("abmil", None, False))  # does the trainer need standardised features?
    json_path = HERE / "results" / ("synthetic_cohort_quick.json" if args.quick else "synthetic_cohort.json")
    checkpoints = tempfile.TemporaryDirectory()  # each fold's plain model, the MHIM teacher's start
    results = {"machine": machine(), "torch": torch.__version__, "protocol": __doc__.split("Protocol.")[1].strip(),
               "settings": vars(args), "configs": []}
    for name, mhim, standardise in configs:
        per_fold = [run_fold(bags, tumour, fold, name, mhim, standardise, args, seed=args.seed + f,
                             baseline=Path(checkpoints.name) / f"{name}_fold{f}") for f, fold in enumerate(folds)]
        label = name + (f" + MHIM, {mhim} teacher" if mhim else "") + ("" if standardise else ", raw features")
        variants = [(label, [rows[0] for rows in per_fold])]
        if len(per_fold[0]) > 1:
            variants.append((label + ", ridge classifier", [rows[1] for rows in per_fold]))
        for lab, rows in variants:
            r = summarise(lab, name, mhim, standardise, rows)
            results["configs"].append(r)
            print(f"{lab:44s} AUC {r['auc_mean']:.3f} ± {r['auc_sd']:.3f}  localisation {r['localisation_auc_mean']:.3f} "
                  f"± {r['localisation_auc_sd']:.3f}  bal. acc. {r['balanced_accuracy_mean']:.3f} ± "
                  f"{r['balanced_accuracy_sd']:.3f}  {r['seconds_mean']:.1f} s/fold", flush=True)
        json_path.parent.mkdir(exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2))

    print("\n| configuration | slide AUC | localisation AUC | balanced accuracy | training s/fold | best epoch | masked "
          "| tumour masked |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["configs"]:
        cells = [f"{r[k + '_mean']:.3f} ± {r[k + '_sd']:.3f}" for k in ("auc", "localisation_auc", "balanced_accuracy")]
        seconds = f"{r['seconds_mean']:.1f} ± {r['seconds_sd']:.1f}" + (
            f" (+ ridge {r['ridge_seconds_mean'] * 1000:.0f} ms)" if "ridge_seconds_mean" in r else "")
        print(f"| {r['config']} | {' | '.join(cells)} | {seconds} | {r['best_epoch_mean']:.1f} | {r['masked_share_mean']:.2f} "
              f"| {r['tumour_masked_mean']:.2f} |")
    by_label = {r["config"]: r for r in results["configs"]}
    if "abmil" in by_label and "extreme_abmil" in by_label:
        dim = bags[0].features.shape[1]
        deep = parameter_counts(create_model("abmil", dim, 2, **MODEL_CFG["abmil"]))[1]
        extreme = parameter_counts(create_model("extreme_abmil", dim, 2, **MODEL_CFG["extreme_abmil"]))[1]
        d, e = by_label["abmil"], by_label["extreme_abmil"]
        results["extreme_vs_deep"] = {
            "trainable_deep": deep, "trainable_extreme": extreme, "ratio": round(deep / extreme, 1),
            "auc_gap": round(d["auc_mean"] - e["auc_mean"], 4),
            "auc_gap_ridge": round(d["auc_mean"] - by_label["extreme_abmil, ridge classifier"]["auc_mean"], 4),
            "seconds_deep": d["seconds_mean"], "seconds_extreme": e["seconds_mean"],
            "ridge_seconds": by_label["extreme_abmil, ridge classifier"]["ridge_seconds_mean"],
        }
        print(f"Extreme vs deep ABMIL: {extreme} vs {deep} trainable parameters ({deep / extreme:.0f}x fewer), "
              f"AUC gap {results['extreme_vs_deep']['auc_gap']:+.3f} (ridge {results['extreme_vs_deep']['auc_gap_ridge']:+.3f}), "
              f"{e['seconds_mean']:.1f} vs {d['seconds_mean']:.1f} s/fold")
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(f"total {results['total_seconds'] / 60:.1f} min")
    json_path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
