"""`napari-mil train`: cross-validated training with test predictions."""

from __future__ import annotations

import sys
from pathlib import Path

from napari_mil.atomic import write_csv, write_json
from napari_mil.cli.output import progress_bar
from napari_mil.errors import NapariMilError


def cmd_train(args) -> int:
    """Cross-validated training (or the CSV's own train/val/test split) with test predictions."""
    import numpy as np
    from tqdm import tqdm

    from napari_mil.training.data import load_bags, patient_folds, read_labels
    from napari_mil.training.metrics import binary_metrics, cross_validation_summary
    from napari_mil.training.mhim import preset
    from napari_mil.training.trainer import TrainConfig, mhim_bag_size_warnings, predict_probs, train

    try:
        model_cfg = _model_cfg(args)  # checked before the bags are read
        records = read_labels(args.labels)
        bags = load_bags(records, args.features, args.encoder)
        overrides = {"mask_ratio_h": _fraction(args.mask_ratio_h, "--mask-ratio-h")} if args.mask_ratio_h is not None else {}
        mhim = preset(args.mhim, score=args.mhim_score, **overrides) if args.mhim else None
        if overrides and mhim is None:
            raise NapariMilError("--mask-ratio-h changes an MHIM-MIL preset: give --mhim too")
    except (NapariMilError, KeyError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    if all(r.split for r in records):
        split = {name: np.array([i for i, r in enumerate(records) if r.split == name]) for name in ("train", "val", "test")}
        folds = [split]
    else:
        folds = patient_folds(bags, args.folds, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(model=args.model, model_cfg=model_cfg, epochs=args.epochs, min_epochs=args.min_epochs,
                      patience=args.patience, lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
                      normalisation=args.normalisation, bag_shift=args.bag_shift, seed=args.seed, mhim=mhim,
                      device=args.device, teacher=args.teacher, teacher_init=args.teacher_init,
                      init_student=args.init_student)
    if mhim is not None and not args.quiet:
        for warning in mhim_bag_size_warnings(mhim, bags):  # said at the start, not after hours of training
            print(f"warning: {warning}", file=sys.stderr)
    rows, summary = [], {"folds": []}
    for k, fold in enumerate(folds):
        pick = lambda name: [bags[i] for i in fold[name]]  # noqa: E731
        bar = progress_bar(total=args.epochs, desc=f"fold {k + 1}/{len(folds)}", unit="epoch", disable=args.quiet,
                        lines=True)

        def on_epoch(r, bar=bar):
            bar.update(1)
            bar.set_postfix(loss=f"{r.train_loss:.3f}", val_loss=f"{r.val_loss:.3f}", val_auc=f"{r.val_auc:.3f}")

        try:
            result = train(pick("train"), pick("val"), cfg, checkpoint=out / f"{args.model}_fold{k}", on_epoch=on_epoch,
                           extra_meta={"encoder": args.encoder})
        except NapariMilError as exc:
            bar.close()
            print(f"error: fold {k + 1}: {exc}", file=sys.stderr)
            return 1
        bar.close()
        # train() repeats the bag-size warnings of the fold's bags; their gist was said at the start
        said = mhim_bag_size_warnings(mhim, pick("train")) if mhim is not None else []
        for warning in result.warnings + (result.baseline.warnings if result.baseline else []):
            if warning not in said:
                print(f"warning: fold {k + 1}: {warning}", file=sys.stderr)
        test = pick("test")
        if test:
            probs, _ = predict_probs(result.model, test, next(result.model.parameters()).device)
            for bag, p in zip(test, probs[:, -1]):
                rows.append({"slide_id": bag.slide_id, "patient_id": bag.patient_id, "fold": k, "label": bag.label,
                             "probability": f"{p:.6f}", "predicted": int(p >= result.threshold)})
            labels = np.array([b.label for b in test]) == max(b.label for b in bags)
            metrics = binary_metrics(labels, probs[:, -1], result.threshold)
        else:
            metrics = {}
        summary["folds"].append({"fold": k, "checkpoint": result.checkpoint.name, "best_epoch": result.best_epoch,
                                 "threshold": result.threshold, "n_test": len(test),
                                 "n_test_by_class": [sum(b.label == c for b in test)
                                                     for c in range(max(b.label for b in bags) + 1)],
                                 "val": result.val_metrics, "test": metrics, "warnings": result.warnings})
        if not args.quiet and metrics:
            tqdm.write(f"fold {k + 1}: test AUC {metrics['auc']:.3f}, balanced accuracy {metrics['balanced_accuracy']:.3f} "
                       f"(threshold {result.threshold:.3f} from validation)")
    if rows:
        labels = np.array([r["label"] for r in rows]) == max(b.label for b in bags)
        probs = np.array([float(r["probability"]) for r in rows])
        summary.update(cross_validation_summary(labels, probs, [r["fold"] for r in rows], n_boot=1000))
        write_csv(out / "predictions.csv", rows)
        if not args.quiet:
            lo, hi = summary["pooled_test_auc_95ci"]
            pooled = "pooled out-of-fold test AUC" if len(folds) > 1 else "test AUC"
            print(f"{pooled} {summary['pooled_test_auc']:.3f} (95% CI {lo:.3f}-{hi:.3f}, bootstrap) "
                  f"over {summary['n_test_slides']} slides ({summary['n_test_positive']} positive)")
            if len(folds) > 1:
                with_auc = sum(np.isfinite(a) for a in summary["test_auc_per_fold"].values())
                print(f"per-fold test AUC {summary['test_auc_mean']:.3f} ± {summary['test_auc_sd']:.3f} (sd) "
                      f"over {with_auc} folds")
        for warning in summary["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
    write_json(out / "summary.json", summary)
    return 0


def _fraction(value: float, option: str) -> float:
    import math

    if not (math.isfinite(value) and 0 <= value <= 1):
        raise NapariMilError(f"{option} must be a fraction between 0 and 1, not {value}")
    return value


def _model_cfg(args) -> dict:
    """TrainConfig.model_cfg from the model-size options (TransMIL's), checked."""
    from napari_mil.training.model_options import transmil_options

    sizes = {"dim": args.transmil_dim, "heads": args.transmil_heads, "landmarks": args.transmil_landmarks}
    if args.model != "transmil":
        given = [f"--transmil-{k}" for k, v in sizes.items() if v is not None]
        if given:
            raise NapariMilError(f"{', '.join(given)} set(s) TransMIL's size: use it with --model transmil")
        return {}
    if getattr(args, "teacher_init", None) and any(v is not None for v in sizes.values()):
        raise NapariMilError("with --teacher-init the student takes the baseline's TransMIL size: "
                             "leave out --transmil-dim/--transmil-heads/--transmil-landmarks")
    return transmil_options(**sizes)
