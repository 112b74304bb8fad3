"""Choosing the offline default encoder: ABMIL on each candidate's features, synthetic cohort.

    .venv/bin/python benchmarks/bench_default_encoder.py [--slides 40] [--folds 5]

Protocol. A synthetic cohort (half tumour-free, tumour burden log-uniform from 0.3% to 40% of
the tissue, two slides per patient) is tiled at 20x in 256 px patches. For each candidate
encoder, features are extracted once (cached in benchmarks/.cache/). Patient-level stratified
k-fold cross-validation: in each fold the test patients are held out; of the rest, a
stratified fifth is the validation set, which picks the epoch (early stopping on validation
loss); features are standardised with training-set statistics. The model is ungated ABMIL
(Ilse et al. 2018; 64-d embedding), Adam, lr 5e-4, weight decay 1e-4, up to 60 epochs.
Reported per encoder, mean ± sd over folds: the test slide AUC, and the attention
localisation AUC (per positive test slide, attention scores against patches whose ground-truth
tumour fraction is >= 0.5, averaged over slides that have both kinds of patch).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

from napari_mil.training.metrics import roc_auc

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
sys.path.insert(0, str(HERE))


def cohort(n_slides: int) -> list[dict]:
    from napari_mil.synthetic import make_cohort

    folder = CACHE / f"cohort_{n_slides}"
    csv_path = folder / "labels.csv"
    if not csv_path.exists():
        print(f"generating a {n_slides}-slide synthetic cohort (once)...", flush=True)
        make_cohort(folder, n_slides=n_slides, seed=7, width=6144, height=4608, mpp=0.5)
    rows = list(csv.DictReader(open(csv_path)))
    for r in rows:
        r["path"] = folder / r["path"]
    return rows


def bags_for(rows, encoder_name: str, features_root: Path = CACHE / "features"):
    """Features, coords and per-patch tumour fractions for every slide (extracted once)."""
    from napari_mil.encoders import create_encoder
    from napari_mil.features.extract import extract_features
    from napari_mil.slide import open_slide
    from napari_mil.synthetic import SyntheticSlide
    from napari_mil.tiling import make_patch_grid, tissue_fractions
    from napari_mil.tissue import TissueMask, detect_tissue

    encoder = create_encoder(encoder_name, device="cpu")
    out, t = [], time.perf_counter()
    for r in rows:
        with open_slide(r["path"]) as slide:
            grid = make_patch_grid(slide, detect_tissue(slide), patch_size=256, magnification=20, min_tissue=0.5)
        bag = extract_features(r["path"], grid, encoder, features_root, num_workers=2).bag
        info = SyntheticSlide.load(r["path"])
        tumour = tissue_fractions(TissueMask(info.tumour_mask(), (info.mask_downsample,) * 2), bag.coords, grid.patch_size_level0)
        out.append({"features": bag.features.astype(np.float32), "coords": bag.coords, "tumour": tumour,
                    "label": int(r["label"]), "patient": r["patient_id"]})
    return out, time.perf_counter() - t


def patient_folds(bags, k: int, seed: int) -> list[np.ndarray]:
    """Test-slide indices per fold, patients stratified by label."""
    rng = np.random.default_rng(seed)
    patients = sorted({b["patient"] for b in bags})
    label_of = {p: max(b["label"] for b in bags if b["patient"] == p) for p in patients}
    folds = [[] for _ in range(k)]
    for label in (0, 1):
        group = [p for p in patients if label_of[p] == label]
        rng.shuffle(group)
        for i, p in enumerate(group):
            folds[i % k].append(p)
    return [np.array([i for i, b in enumerate(bags) if b["patient"] in set(f)]) for f in folds]


def train_abmil(train, val, dim: int, seed: int, epochs: int = 60):
    import torch

    from napari_mil.models.abmil import ABMIL

    torch.manual_seed(seed)
    stacked = np.concatenate([b["features"] for b in train])
    mean, std = stacked.mean(0), stacked.std(0) + 1e-6
    norm = lambda f: torch.from_numpy((f - mean) / std).float()[None]  # noqa: E731  (1, N, D)
    model = ABMIL(dim, 2, embed_dim=64, attn_dim=64)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    best, best_state = float("inf"), None
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        model.train()
        for i in rng.permutation(len(train)):
            out = model(norm(train[i]["features"]))
            loss = loss_fn(out.logits, torch.tensor([train[i]["label"]]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val_loss = np.mean([loss_fn(model(norm(b["features"])).logits, torch.tensor([b["label"]])).item() for b in val])
        if val_loss < best:
            best, best_state = val_loss, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval(), norm


def evaluate(encoder_name: str, bags, folds_k: int, seed: int) -> dict:
    import torch

    dim = bags[0]["features"].shape[1]
    slide_aucs, loc_aucs = [], []
    t = time.perf_counter()
    for f, test_idx in enumerate(patient_folds(bags, folds_k, seed)):
        rest = [i for i in range(len(bags)) if i not in set(test_idx)]
        rng = np.random.default_rng(seed + f)
        val_idx = set()
        for label in (0, 1):  # a stratified fifth of the training slides validates
            group = [i for i in rest if bags[i]["label"] == label]
            val_idx |= set(rng.choice(group, max(1, len(group) // 5), replace=False).tolist())
        train = [bags[i] for i in rest if i not in val_idx]
        val = [bags[i] for i in val_idx]
        model, norm = train_abmil(train, val, dim, seed + f)
        probs, locs = [], []
        with torch.no_grad():
            for i in test_idx:
                out = model(norm(bags[i]["features"]))
                probs.append(torch.softmax(out.logits, 1)[0, 1].item())
                tumour = bags[i]["tumour"] >= 0.5
                if bags[i]["label"] == 1 and tumour.any() and (~tumour).any():
                    locs.append(roc_auc(tumour, out.attention[0].numpy()))
        slide_aucs.append(roc_auc(np.array([bags[i]["label"] for i in test_idx]), np.array(probs)))
        loc_aucs.append(np.nanmean(locs) if locs else float("nan"))
    return {
        "encoder": encoder_name, "dim": dim,
        "slide_auc_mean": round(float(np.nanmean(slide_aucs)), 3), "slide_auc_sd": round(float(np.nanstd(slide_aucs)), 3),
        "localisation_auc_mean": round(float(np.nanmean(loc_aucs)), 3), "localisation_auc_sd": round(float(np.nanstd(loc_aucs)), 3),
        "folds": folds_k, "train_seconds": round(time.perf_counter() - t, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=40)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--encoders", default="hne_stats,random_cnn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from bench_slide_to_tiles import machine

    rows = cohort(args.slides)
    print(f"cohort: {len(rows)} slides, {sum(int(r['label']) for r in rows)} with tumour")
    results = {"machine": machine(), "protocol": __doc__.split("Protocol.")[1].strip(), "encoders": []}
    for name in args.encoders.split(","):
        bags, extract_s = bags_for(rows, name)
        r = evaluate(name, bags, args.folds, args.seed)
        r["extract_seconds"] = round(extract_s, 1)
        r["patches"] = int(sum(len(b["features"]) for b in bags))
        results["encoders"].append(r)
        print(f"{name:12s} {r['dim']:4d}-d: slide AUC {r['slide_auc_mean']:.3f} ± {r['slide_auc_sd']:.3f}, "
              f"attention localisation AUC {r['localisation_auc_mean']:.3f} ± {r['localisation_auc_sd']:.3f} "
              f"({args.folds}-fold CV; features {extract_s:.0f} s, training {r['train_seconds']:.0f} s, {r['patches']} patches)")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "default_encoder.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
