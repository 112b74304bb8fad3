"""`napari-mil predict`: slide predictions and attention files, from a checkpoint or out of fold."""

from __future__ import annotations

from napari_mil.atomic import write_csv
from napari_mil.cli.output import error, failure, note, output_folder, progress_bar
from napari_mil.errors import NapariMilError
from napari_mil.names import check_name


def cmd_predict(args) -> int:
    """Slide predictions and per-patch attention from a checkpoint, or out of fold (--oof)."""
    from napari_mil.features.store import FeatureBag, feature_path
    from napari_mil.training.checkpoints import checkpoint_encoder, load_for_prediction
    from napari_mil.usecases.prediction import predict_bag, write_prediction

    if args.oof:
        return _predict_out_of_fold(args)
    if not args.checkpoint or not args.slides:
        error("give slide IDs and --checkpoint, or --oof MODELS_DIR (the --out folder of train)")
        return 2
    twice = sorted({s for s in args.slides if args.slides.count(s) > 1})
    if twice:
        error(f"slide(s) {', '.join(twice)} given more than once: give each slide once")
        return 2
    try:
        model, meta = load_for_prediction(args.checkpoint, part=args.part)
    except NapariMilError as exc:
        error(exc)
        return 1
    encoder, said = checkpoint_encoder(meta, args.encoder)
    if said:
        note(said)
    out = output_folder(args.out)
    rows, failures = [], 0
    for slide_id in args.slides:
        try:
            bag = FeatureBag.load(feature_path(args.features, encoder, check_name(slide_id)))
            pred = predict_bag(model, meta, bag, slide_id, encoder)
            write_prediction(out, pred, bag, meta, part=args.part)
            rows.append({"slide_id": slide_id, "probability": f"{pred.probability:.6f}", "predicted": pred.predicted,
                         "threshold": f"{pred.threshold:.6f}"})
        except (NapariMilError, OSError) as exc:  # this slide only: the others go on
            failures += 1
            error(failure(exc))
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
        error("--oof takes each fold's checkpoint from MODELS_DIR: leave out --checkpoint")
        return 2
    out = output_folder(args.out)
    bar = progress_bar(total=0, desc="out of fold", unit="slide", disable=args.quiet)

    def progress(p, bar=bar):
        bar.total = p.total
        bar.update(1)

    try:
        result = out_of_fold(args.oof, args.features, out, encoder=args.encoder, part=args.part,
                             slides=args.slides or None, progress=progress)
    except NapariMilError as exc:
        error(exc)
        return 2
    finally:
        bar.close()
    for said in result.notes:
        note(said)
    for message in result.errors:
        error(message)
    if result.rows:
        write_csv(out / "predictions.csv", result.rows)
        if not args.quiet:
            for r in result.rows:
                print(f"{r['slide_id']} (fold {r['fold']}): p = {float(r['probability']):.3f} -> class {r['predicted']}")
            print(f"{len(result.rows)} slides out of fold: {out / 'predictions.csv'} and {out / 'attention'}/")
    return 1 if result.errors else 0
