"""Musk1: the napari-mil models on a real MIL benchmark, Ilse et al. (2018)'s protocol.

    .venv/bin/python benchmarks/bench_musk1.py [--repeats 5] [--models abmil,abmil_gated,extreme_abmil,transmil]

Protocol. Musk1 (92 bags, 47 positive, 476 instances of 166 features; benchmarks/data/musk1.csv)
is split by stratified 10-fold cross-validation, repeated 5 times with different shuffles.
In each fold the model is trained on the other nine folds for a fixed number of epochs (no
early stopping, so no validation split is drawn from these small folds) with Adam (lr 5e-4,
weight decay 5e-3, betas 0.9/0.999, as Ilse et al.), one bag per step; features are
standardised with the training folds' statistics. Bags are classified at probability 0.5 (no
threshold is tuned). Reported: test accuracy, mean ± sd over the 5 repetitions of the 10-fold
mean. Ilse et al. 2018 report 0.892 ± 0.040 (ABMIL) and 0.900 ± 0.050 (gated ABMIL).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODEL_CFG = {
    "abmil": dict(embed_dim=128, attn_dim=64),
    "abmil_gated": dict(embed_dim=128, attn_dim=64),
    "extreme_abmil": dict(attn_dim=128),
    "transmil": dict(dim=128, heads=4, landmarks=16, dropout=0.0),
    "mean_pool": dict(embed_dim=128),
    "max_pool": dict(embed_dim=128),
}
PAPER = {"abmil": "0.892 ± 0.040", "abmil_gated": "0.900 ± 0.050"}


def load_musk1() -> tuple[list[np.ndarray], np.ndarray]:
    rows = list(csv.reader(open(HERE / "data" / "musk1.csv")))
    bags: dict[str, list] = {}
    labels: dict[str, int] = {}
    for r in rows:
        bags.setdefault(r[1], []).append([float(v) for v in r[2:]])
        labels[r[1]] = int(r[0])
    ids = list(bags)
    return [np.asarray(bags[i], np.float32) for i in ids], np.array([labels[i] for i in ids])


def stratified_folds(labels: np.ndarray, k: int, rng) -> list[np.ndarray]:
    folds = [[] for _ in range(k)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        for j, i in enumerate(idx):
            folds[j % k].append(i)
    return [np.array(sorted(f)) for f in folds]


def fit_and_score(name, train_x, train_y, test_x, test_y, epochs, seed) -> float:
    from napari_mil.models import create_model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    stacked = np.concatenate(train_x)
    mean, std = stacked.mean(0), stacked.std(0) + 1e-6
    model = create_model(name, train_x[0].shape[1], 2, **MODEL_CFG[name])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-4, betas=(0.9, 0.999), weight_decay=5e-3)
    tensors = [torch.from_numpy((x - mean) / std)[None] for x in train_x]  # (1, N, D) each
    for _ in range(epochs):
        model.train()
        for i in rng.permutation(len(tensors)):
            loss = torch.nn.functional.cross_entropy(model(tensors[i]).logits, torch.tensor([int(train_y[i])]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = [model(torch.from_numpy((x - mean) / std)[None]).logits.argmax(1).item() for x in test_x]
    return float(np.mean(np.array(pred) == test_y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--models", default="abmil,abmil_gated,extreme_abmil,transmil")
    parser.add_argument("--out", default="musk1.json", help="results file under benchmarks/results/")
    args = parser.parse_args()
    from bench_slide_to_tiles import machine

    torch.set_num_threads(1)  # bags of ~5 instances: threads only add overhead
    bags, labels = load_musk1()
    print(f"Musk1: {len(bags)} bags ({labels.sum()} positive), {sum(len(b) for b in bags)} instances, {bags[0].shape[1]} features")
    results = {"machine": machine(), "protocol": __doc__.split("Protocol.")[1].strip(), "models": []}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        repeat_means, fold_accs = [], []
        for r in range(args.repeats):
            rng = np.random.default_rng(1000 + r)
            accs = []
            for f, test in enumerate(stratified_folds(labels, args.folds, rng)):
                train = np.setdiff1d(np.arange(len(bags)), test)
                accs.append(fit_and_score(name, [bags[i] for i in train], labels[train], [bags[i] for i in test],
                                          labels[test], args.epochs, seed=100 * r + f))
            repeat_means.append(float(np.mean(accs)))
            fold_accs += accs
        # the spread over repetitions of the 10-fold mean; with one repetition, over its folds
        spread = repeat_means if args.repeats > 1 else fold_accs
        mean, sd = float(np.mean(repeat_means)), float(np.std(spread))
        seconds = time.perf_counter() - t0
        results["models"].append({"model": name, "accuracy_mean": round(mean, 3), "accuracy_sd": round(sd, 3),
                                  "repeat_means": [round(v, 3) for v in repeat_means],
                                  "sd_over": "repetitions" if args.repeats > 1 else "folds", "seconds": round(seconds, 1),
                                  "paper": PAPER.get(name, "")})
        paper = f" (Ilse et al. 2018: {PAPER[name]})" if name in PAPER else ""
        print(f"{name:14s} accuracy {mean:.3f} ± {sd:.3f}{paper}  [{args.repeats}x{args.folds}-fold, {seconds:.0f} s]", flush=True)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
