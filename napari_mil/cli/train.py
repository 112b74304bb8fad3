"""`napari-mil train`: cross-validated training with test predictions (usecases.cross_validation)."""

from __future__ import annotations

from napari_mil.cli.output import error, progress_bar, warning, write_line
from napari_mil.errors import NapariMilError


class _FoldBars:
    """One epoch bar per fold (a line per epoch in a log), made at the fold's first epoch."""

    def __init__(self, n_folds: int, epochs: int, quiet: bool):
        self.n_folds, self.epochs, self.quiet = n_folds, epochs, quiet
        self.fold, self.bar = None, None

    def on_epoch(self, fold: int, r) -> None:
        if fold != self.fold:
            self.close()
            self.fold = fold
            self.bar = progress_bar(total=self.epochs, desc=f"fold {fold + 1}/{self.n_folds}", unit="epoch",
                                    disable=self.quiet, lines=True)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{r.train_loss:.3f}", val_loss=f"{r.val_loss:.3f}", val_auc=f"{r.val_auc:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_train(args) -> int:
    """Cross-validated training (or the CSV's own train/val/test split) with test predictions."""
    import numpy as np

    from napari_mil.training.data import load_bags, read_labels
    from napari_mil.training.mhim import preset
    from napari_mil.training.trainer import TrainConfig, mhim_bag_size_warnings
    from napari_mil.usecases.cross_validation import FoldError, cross_validate, make_folds

    try:
        model_cfg = _model_cfg(args)  # checked before the bags are read
        records = read_labels(args.labels)
        bags = load_bags(records, args.features, args.encoder)
        overrides = {"mask_ratio_h": _fraction(args.mask_ratio_h, "--mask-ratio-h")} if args.mask_ratio_h is not None else {}
        mhim = preset(args.mhim, score=args.mhim_score, **overrides) if args.mhim else None
        if overrides and mhim is None:
            raise NapariMilError("--mask-ratio-h changes an MHIM-MIL preset: give --mhim too")
    except (NapariMilError, KeyError) as exc:
        error(exc.args[0] if isinstance(exc, KeyError) else exc)
        return 2
    folds = make_folds(records, bags, k=args.folds, seed=args.seed)
    cfg = TrainConfig(model=args.model, model_cfg=model_cfg, epochs=args.epochs, min_epochs=args.min_epochs,
                      patience=args.patience, lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
                      normalisation=args.normalisation, bag_shift=args.bag_shift, seed=args.seed, mhim=mhim,
                      device=args.device, teacher=args.teacher, teacher_init=args.teacher_init,
                      init_student=args.init_student)
    if mhim is not None and not args.quiet:
        for said in mhim_bag_size_warnings(mhim, bags):  # said at the start, not after hours of training
            warning(said)
    bars = _FoldBars(len(folds), args.epochs, args.quiet)

    def on_fold(done) -> None:
        bars.close()
        for own in done.warnings:  # the bag-size warnings were said at the start
            warning(f"fold {done.fold + 1}: {own}")
        if not args.quiet and done.test_metrics:
            m = done.test_metrics
            write_line(f"fold {done.fold + 1}: test AUC {m['auc']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f} "
                       f"(threshold {done.result.threshold:.3f} from validation)")

    try:
        cv = cross_validate(bags, folds, cfg, args.out, extra_meta={"encoder": args.encoder},
                            on_epoch=bars.on_epoch, on_fold=on_fold)
    except FoldError as exc:
        bars.close()
        error(exc)
        return 1
    summary = cv.summary
    if cv.rows:
        if not args.quiet:
            lo, hi = summary["pooled_test_auc_95ci"]
            pooled = "pooled out-of-fold test AUC" if len(folds) > 1 else "test AUC"
            print(f"{pooled} {summary['pooled_test_auc']:.3f} (95% CI {lo:.3f}-{hi:.3f}, bootstrap) "
                  f"over {summary['n_test_slides']} slides ({summary['n_test_positive']} positive)")
            if len(folds) > 1:
                with_auc = sum(np.isfinite(a) for a in summary["test_auc_per_fold"].values())
                print(f"per-fold test AUC {summary['test_auc_mean']:.3f} ± {summary['test_auc_sd']:.3f} (sd) "
                      f"over {with_auc} folds")
        for said in summary["warnings"]:
            warning(said)
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
