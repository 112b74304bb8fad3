"""`napari-mil predict`: slide predictions and attention files, from a checkpoint or out of fold."""

from __future__ import annotations

import sys
from pathlib import Path

from napari_mil.atomic import write_csv
from napari_mil.cli.output import progress_bar
from napari_mil.errors import NapariMilError


def cmd_predict(args) -> int:
    """Slide predictions and per-patch attention from a checkpoint, or out of fold (--oof)."""
    from napari_mil.features.store import FeatureBag, feature_path
    from napari_mil.training.checkpoints import checkpoint_encoder, load_for_prediction
    from napari_mil.usecases.prediction import predict_bag, write_prediction

    if args.oof:
        return _predict_out_of_fold(args)
    if not args.checkpoint or not args.slides:
        print("error: give slide IDs and --checkpoint, or --oof MODELS_DIR (the --out folder of train)", file=sys.stderr)
        return 2
    try:
        model, meta = load_for_prediction(args.checkpoint, part=args.part)
    except NapariMilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    encoder, note = checkpoint_encoder(meta, args.encoder)
    if note:
        print(f"note: {note}", file=sys.stderr)
    out = Path(args.out)
    rows, failures = [], 0
    for slide_id in args.slides:
        try:
            bag = FeatureBag.load(feature_path(args.features, encoder, slide_id))
            pred = predict_bag(model, meta, bag, slide_id, encoder)
            write_prediction(out, pred, bag, meta, part=args.part)
            rows.append({"slide_id": slide_id, "probability": f"{pred.probability:.6f}", "predicted": pred.predicted,
                         "threshold": f"{pred.threshold:.6f}"})
        except NapariMilError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
    if rows:
        write_csv(out / "predictions.csv", rows)
        if not args.quiet:
            for r in rows:
                print(f"{r['slide_id']}: p = {float(r['probability']):.3f} -> class {r['predicted']}")
    return 1 if failures else 0


def _predict_out_of_fold(args) -> int:
    """Every test slide of a cross-validated run, scored by its own fold's checkpoint."""
    from napari_mil.usecases.prediction import out_of_fold

    if args.checkpoint:
        print("error: --oof takes each fold's checkpoint from MODELS_DIR: leave out --checkpoint", file=sys.stderr)
        return 2
    bar = progress_bar(total=0, desc="out of fold", unit="slide", disable=args.quiet)

    def progress(p, bar=bar):
        bar.total = p.total
        bar.update(1)

    try:
        result = out_of_fold(args.oof, args.features, args.out, encoder=args.encoder, part=args.part,
                             slides=args.slides or None, progress=progress)
    except NapariMilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for message in result.errors:
        print(f"error: {message}", file=sys.stderr)
    if result.rows:
        write_csv(Path(args.out) / "predictions.csv", result.rows)
        if not args.quiet:
            for r in result.rows:
                print(f"{r['slide_id']} (fold {r['fold']}): p = {float(r['probability']):.3f} -> class {r['predicted']}")
            print(f"{len(result.rows)} slides out of fold: {Path(args.out) / 'predictions.csv'} and "
                  f"{Path(args.out) / 'attention'}/")
    return 1 if result.errors else 0
