"""The experiment that chose the trainer's defaults, on the semi-real cohort.

    .venv/bin/python benchmarks/bench_training_defaults.py [--slides 60] [--seeds 3]

Protocol. The semi-real cohort of benchmarks/semireal_data.py (60 slides, default difficulty,
hne_stats features). ABMIL (128-d, dropout 0.25 unless stated) trained by napari_mil.training.trainer.train with each
candidate configuration over patient-level 5-fold cross-validation (a stratified fifth of the
training patients validates: early stopping, model selection), repeated for 3 fold seeds (the
model seed follows the fold seed). Reported, mean ± sd over the seeds: the pooled out-of-fold
slide AUC and the attention localisation AUC (positive test slides, lesion patches are those
at least half covered by the lesion), and the folds that warned they did not learn.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from semireal_data import bags, cohort, cross_validate  # noqa: E402


def candidates():
    from napari_mil.training.trainer import TrainConfig

    old = TrainConfig(epochs=30, lr=2e-4, patience=8, min_epochs=0, schedule="constant", normalisation="none",
                      model_cfg={"dropout": 0.0}, device="cpu")
    new = TrainConfig(device="cpu")
    return {
        "previous defaults (raw features, lr 2e-4 constant, 30 epochs, patience 8, no dropout)": old,
        "previous + global normalisation": replace(old, normalisation="global"),
        "previous + global normalisation, lr 1e-3": replace(old, normalisation="global", lr=1e-3),
        "new default (global, lr 1e-3 cosine, 40 epochs, min 15, patience 10, dropout 0.25)": new,
        "new default without dropout": replace(new, model_cfg={"dropout": 0.0}),
        "new default, per-slide normalisation": replace(new, normalisation="slide"),
        "new default, bag shift 0.5 (stain augmentation)": replace(new, bag_shift=0.5),
        "new default, lr 3e-4": replace(new, lr=3e-4),
        "new default, no early stopping (last epoch)": replace(new, patience=new.epochs),
    }


def main() -> None:
    from napari_mil.training.data import patient_folds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", default=None, help="run the candidates whose name contains this")
    parser.add_argument("--difficulty", type=float, default=None, help="the cohort's difficulty (default: the generator's)")
    args = parser.parse_args()
    from napari_mil.synthetic.semireal import DEFAULT_DIFFICULTY

    difficulty = DEFAULT_DIFFICULTY if args.difficulty is None else args.difficulty
    all_bags, lesion = bags(cohort(args.slides, difficulty))
    print(f"ABMIL, {args.slides} semi-real slides at difficulty {difficulty}, 5 folds x {args.seeds} seeds")
    print("| configuration | slide AUC | localisation AUC | folds warned | s/fold |\n|---|---|---|---|---|")
    for name, cfg in candidates().items():
        if args.only and args.only not in name:
            continue
        runs = [cross_validate(all_bags, lesion, patient_folds(all_bags, 5, seed), replace(cfg, seed=seed))
                for seed in range(args.seeds)]
        auc, loc = [r["auc"] for r in runs], [r["localisation"] for r in runs]
        print(f"| {name} | {np.mean(auc):.3f} ± {np.std(auc):.3f} | {np.mean(loc):.3f} ± {np.std(loc):.3f} "
              f"| {sum(r['warned_folds'] for r in runs)}/{5 * len(runs)} | {np.mean([r['seconds'] for r in runs]) / 5:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
