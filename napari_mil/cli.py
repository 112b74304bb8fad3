"""Command line: the same core functions as the napari docks.

    napari-mil tile SLIDE|FOLDER|CSV ... --out DIR
    napari-mil extract SLIDE|FOLDER|CSV ... --out DIR [--encoder NAME]
    napari-mil encoders
    napari-mil train LABELS.csv --features DIR --out MODELS [--model abmil] [--mhim PRESET]
    napari-mil predict SLIDE_ID ... --checkpoint CKPT --features DIR --out DIR [--part teacher]
    napari-mil predict --oof MODELS --features DIR --out DIR   (each slide by its own fold's model)
    napari-mil export ATTENTION.h5 --out DIR [--formats geojson,csv,png,topk] [--slide SLIDE]
    napari-mil synthetic OUT.tif | --cohort N OUT_DIR
    napari-mil demo [--headless OUT] [--slide synthetic|cmu1]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from napari_mil import __version__
from napari_mil.atomic import atomic_path, write_csv, write_json
from napari_mil.errors import NapariMilError


def expand_inputs(inputs: list[str]) -> list[tuple[Path, float | None]]:
    """Slides from files, folders (not recursive) and CSVs (column ``path``, optional ``mpp``).

    Relative paths in a CSV are relative to the CSV's folder.
    """
    from napari_mil.slide.base import is_slide_path

    out: list[tuple[Path, float | None]] = []
    for item in inputs:
        p = Path(item)
        if p.suffix.lower() == ".csv":
            if not p.exists():
                raise NapariMilError(f"{p} does not exist")
            with open(p, newline="") as fh:
                reader = csv.DictReader(fh)
                column = next((c for c in ("path", "slide_path", "slide") if c in (reader.fieldnames or [])), None)
                if column is None:
                    raise NapariMilError(f"{p}: no 'path' column (columns: {', '.join(reader.fieldnames or [])})")
                for row in reader:
                    sp = Path(row[column])
                    if not sp.is_absolute():
                        sp = p.parent / sp
                    mpp = float(row["mpp"]) if row.get("mpp") else None
                    out.append((sp, mpp))
        elif p.is_dir() and not any(p.glob("*.dcm")):
            out.extend((f, None) for f in sorted(p.iterdir()) if f.is_file() and is_slide_path(f))
        else:
            out.append((p, None))
    return out


def tile_one(path: Path, out: Path, args, mpp: float | None) -> tuple[int, float]:
    """Detect, tile and write mask, grid and preview for one slide; return (patches, tissue %)."""
    from PIL import Image

    from napari_mil.slide import open_slide
    from napari_mil.tiling import make_patch_grid, render_grid_preview
    from napari_mil.tissue import detect_tissue

    with open_slide(path, mpp=mpp if mpp is not None else args.mpp) as slide:
        slide.require_mpp()
        overrides = {}
        if args.saturation_threshold is not None:
            overrides["saturation_threshold"] = args.saturation_threshold
        if args.min_tissue_area is not None:
            overrides["min_tissue_area_um2"] = args.min_tissue_area * 1e6
        mask = detect_tissue(slide, args.preset, **overrides)
        mask.save(out / "masks" / f"{slide.name}.png")
        grid = make_patch_grid(
            slide, mask, patch_size=args.patch_size, target_mpp=args.target_mpp,
            magnification=None if args.target_mpp else args.magnification,
            overlap=args.overlap, min_tissue=args.min_tissue,
        )
        grid.save(out / "patches" / f"{slide.name}.h5")
        preview = render_grid_preview(slide, mask, grid)
        with atomic_path(out / "previews" / f"{slide.name}.png") as tmp:
            Image.fromarray(preview).save(tmp, format="PNG")
        return len(grid), mask.tissue_area_fraction


def cmd_tile(args) -> int:
    from tqdm import tqdm

    try:
        slides = expand_inputs(args.slides)
    except NapariMilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not slides:
        print("error: no slide files found in the given inputs", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    rows = []
    for path, mpp in _progress(slides, desc="tiling", unit="slide", disable=args.quiet or len(slides) == 1):
        try:
            n, tissue = tile_one(path, out, args, mpp)
            rows.append({"slide": str(path), "patches": n, "tissue_fraction": f"{tissue:.4f}", "error": ""})
            if not args.quiet:
                tqdm.write(f"{path.name}: {n} patches, tissue {tissue:.1%}")
        except NapariMilError as exc:
            failures += 1
            rows.append({"slide": str(path), "patches": 0, "tissue_fraction": "", "error": str(exc)})
            tqdm.write(f"error: {exc}", file=sys.stderr)
    write_csv(out / "tiling_summary.csv", rows)
    return 1 if failures else 0


def _grid_for(path: Path, out: Path, args, mpp: float | None):
    """The slide's grid: reused from OUT/patches/<slide>.h5 when present, else tiled now."""
    from napari_mil.slide import open_slide
    from napari_mil.tiling import PatchGrid

    with open_slide(path, mpp=mpp if mpp is not None else args.mpp) as slide:
        grid_file = out / "patches" / f"{slide.name}.h5"
        if grid_file.exists():
            return slide.mpp, PatchGrid.load(grid_file, slide=slide)
    tile_one(path, out, args, mpp)
    with open_slide(path, mpp=mpp if mpp is not None else args.mpp) as slide:
        return slide.mpp, PatchGrid.load(grid_file, slide=slide)


def cmd_extract(args) -> int:
    import platform
    import time
    import warnings

    from tqdm import tqdm

    from napari_mil.encoders import create_encoder
    from napari_mil.features.extract import extract_features

    try:
        slides = expand_inputs(args.slides)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            encoder = create_encoder(args.encoder, weights=args.weights, device=args.device)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    except NapariMilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, failures = [], 0
    for path, mpp in slides:
        t0 = time.perf_counter()
        try:
            slide_mpp, grid = _grid_for(path, out, args, mpp)
            bar = _progress(total=len(grid), desc=path.name, unit="tile", disable=args.quiet, leave=False)

            def progress(p, bar=bar):
                bar.n = p.done
                bar.set_postfix(tiles_s=f"{p.tiles_per_s:.0f}", eta=f"{p.eta_s:.0f}s", batch=p.batch_size, refresh=False)
                bar.refresh()

            result = extract_features(
                path, grid, encoder, out, batch_size=args.batch_size, num_workers=args.workers,
                dtype=args.dtype, mpp=slide_mpp, progress=progress,
            )
            bar.close()
            state = "cached" if result.cached else (f"resumed at {result.resumed_from}" if result.resumed_from else "extracted")
            if not args.quiet:
                tqdm.write(f"{path.name}: {len(result.bag)} x {result.bag.dim} features, {state}, "
                           f"{result.seconds:.1f} s" + (f", {result.skipped} unreadable patches skipped" if result.skipped else ""))
            runs.append({"slide": str(path), "features": str(result.path), "patches": len(result.bag),
                         "state": state, "seconds": round(result.seconds, 3), "tiles_per_s": round(result.tiles_per_s, 1),
                         "skipped": result.skipped, "batch_size": result.batch_size})
        except NapariMilError as exc:
            failures += 1
            runs.append({"slide": str(path), "error": str(exc), "seconds": round(time.perf_counter() - t0, 3)})
            tqdm.write(f"error: {exc}", file=sys.stderr)
    import torch

    import napari_mil

    manifest = {
        "command": "extract", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"napari_mil": napari_mil.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "encoder": {"name": encoder.name, "weights_hash": encoder.weights_hash, "dim": encoder.dim,
                    "precision": str(encoder.precision), "device": str(encoder.device)},
        "parameters": {k: v for k, v in vars(args).items() if k not in ("func", "slides")},
        "slides": runs,
    }
    write_json(out / f"extract_manifest_{time.strftime('%Y%m%d-%H%M%S')}.json", manifest)
    return 1 if failures else 0


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
        bar = _progress(total=args.epochs, desc=f"fold {k + 1}/{len(folds)}", unit="epoch", disable=args.quiet,
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
    bar = _progress(total=0, desc="out of fold", unit="slide", disable=args.quiet)

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


def cmd_export(args) -> int:
    """Attention files (from predict) -> QuPath GeoJSON, per-patch CSV, PNG overlay, top-k PNGs."""
    from napari_mil.exports import export_csv, export_geojson, export_overlay_png, export_top_k
    from napari_mil.heatmaps import load_attention
    from napari_mil.slide import open_slide

    formats = set(args.formats.split(","))
    unknown = formats - {"geojson", "csv", "png", "topk"}
    if unknown:
        print(f"error: unknown format(s) {', '.join(sorted(unknown))}; use geojson, csv, png, topk", file=sys.stderr)
        return 2
    if formats & {"topk"} and not args.slide:
        print("error: the top-k patches are read from the slide: give --slide", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        stem = Path(args.attention).stem
        amap, _ = load_attention(args.attention, name=args.name or stem)
        coords, size0 = amap.coords, amap.patch_size_level0
        maps = {amap.name: amap}
        written = []
        if "geojson" in formats:
            written.append(export_geojson(out / f"{stem}.geojson", maps))
        if "csv" in formats:
            written.append(export_csv(out / f"{stem}.csv", maps))
        slide = open_slide(args.slide) if args.slide else None
        try:
            dims = slide.dimensions if slide else tuple(int(v) for v in coords.max(0) + size0)
            if "png" in formats:
                written.append(export_overlay_png(out / f"{stem}.png", amap, dims, args.downsample, how=args.norm,
                                                  colormap=args.colormap))
            if "topk" in formats:
                written += export_top_k(out / f"{stem}_top{args.k}", slide, amap, args.k)
        finally:
            if slide is not None:
                slide.close()
    except (NapariMilError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        for path in written:
            print(path)
    return 0


def _progress(iterable=None, *, lines: bool = False, disable: bool = False, **kwargs):
    """A tqdm bar where stderr is a terminal. Where it is not (a log file), no bar and no
    carriage returns: with ``lines``, one line per ``set_postfix``/``refresh`` (the training
    bars: a line per epoch), else nothing (the commands print a line per slide themselves)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, disable=disable, **kwargs)
    return _LogLines(iterable, disable=disable or not lines, **kwargs)


class _LogLines:
    """What stands in for a tqdm bar in a log: the same calls, whole lines only."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", disable=False, **_):
        self.iterable, self.total, self.desc, self.unit, self.disable = iterable, total, desc, unit, disable
        self.n, self.postfix = 0, {}

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1

    def update(self, n=1):
        self.n += n

    def set_postfix(self, refresh=True, **values):
        self.postfix = values
        if refresh:
            self.refresh()

    def refresh(self):
        if not self.disable:
            extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
            print(f"{self.desc}: {self.unit} {self.n}{f'/{self.total}' if self.total else ''}{extra}",
                  file=sys.stderr, flush=True)

    def close(self):
        pass


def cmd_synthetic(args) -> int:
    from napari_mil.synthetic import make_cohort, make_synthetic_slide

    try:
        if args.semireal:
            from napari_mil.semireal import make_semireal_cohort, make_semireal_slide

            size = {"width": args.width or 7168, "height": args.height or 5632}
            if args.cohort:
                csv_path = make_semireal_cohort(args.out, n_slides=args.cohort, seed=args.seed, difficulty=args.difficulty,
                                                **size)
                print(f"wrote {args.cohort} semi-real slides and {csv_path}")
            else:
                info = make_semireal_slide(args.out, seed=args.seed, lesion_burden=args.tumour_burden,
                                           difficulty=args.difficulty, pen_marks=args.pen_marks,
                                           floaters=3 if args.debris else 0, **size)
                print(f"wrote {info.path} (label {info.label}, lesion {info.tumour_fraction:.2%} of tissue, "
                      f"difficulty {info.difficulty})")
        elif args.cohort:
            csv_path = make_cohort(args.out, n_slides=args.cohort, seed=args.seed, width=args.width or 16384,
                                   height=args.height or 12288, mpp=args.mpp)
            print(f"wrote {args.cohort} slides and {csv_path}")
        else:
            info = make_synthetic_slide(
                args.out, width=args.width or 16384, height=args.height or 12288, mpp=args.mpp, seed=args.seed,
                tumour_burden=args.tumour_burden, pen_marks=args.pen_marks, debris=args.debris,
            )
            print(f"wrote {info.path} (label {info.label}, tumour {info.tumour_fraction:.2%} of tissue)")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args) -> int:
    from napari_mil._napari._demo import run_demo  # Qt is imported only here

    summary = run_demo(headless=args.headless, slide=args.slide, epochs=args.epochs)
    if args.headless:
        print(json.dumps(summary, indent=2))
    return 0


def _add_grid_options(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group()
    target.add_argument("--magnification", type=float, default=20.0, help="target magnification (default 20)")
    target.add_argument("--target-mpp", type=float, default=None, help="target µm per pixel instead of a magnification")
    p.add_argument("--patch-size", type=int, default=256, help="patch side in pixels at the target (default 256)")
    p.add_argument("--overlap", type=int, default=0, help="pixels shared by neighbouring patches (default 0)")
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction per patch (default 0.5)")
    p.add_argument("--preset", choices=["resection", "biopsy"], default="resection")
    p.add_argument("--saturation-threshold", type=int, default=None, help="0-255; default Otsu")
    p.add_argument("--min-tissue-area", type=float, default=None, help="smallest tissue piece kept, mm²")
    p.add_argument("--mpp", type=float, default=None, help="µm per pixel for slides that record none")
    p.add_argument("--quiet", "-q", action="store_true")


def cmd_encoders(args) -> int:
    from napari_mil.encoders import DEFAULT_ENCODER, list_encoders

    for spec in list_encoders():
        mark = " (default)" if spec.name == DEFAULT_ENCODER else ""
        dim = f"{spec.dim}-d" if spec.dim else "?-d"
        needs = f"  [needs {spec.needs}]" if spec.needs else ""
        print(f"{spec.name:16s} {dim:>7s}  {spec.description}{mark}{needs}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-mil", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"napari-mil {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tile", help="detect tissue and write masks, patch grids and previews")
    t.add_argument("slides", nargs="+", help="slide files, folders of slides, or CSVs with a 'path' column")
    t.add_argument("--out", "-o", required=True, help="output folder (masks/, patches/, previews/)")
    _add_grid_options(t)
    t.set_defaults(func=cmd_tile)

    from napari_mil.semireal import DEFAULT_DIFFICULTY

    s = sub.add_parser("synthetic", help="write a synthetic H&E slide (or a cohort) with ground truth",
                       description="Cartoon slides (easy: every model separates them) or, with --semireal, slides "
                                   "of real H&E texture with subtle nuclear-atypia lesions, stain variation and "
                                   "mimics, for learning that is not trivial.")
    s.add_argument("out", help="output .tif (or a folder with --cohort)")
    s.add_argument("--semireal", action="store_true", help="semi-real slides (napari_mil.semireal) instead of cartoons")
    s.add_argument("--difficulty", type=float, default=DEFAULT_DIFFICULTY,
                   help="semi-real: 0 obvious lesions, 1 none visible (default %(default)s, calibrated in "
                        "docs/benchmarks.md)")
    s.add_argument("--cohort", type=int, default=0, help="write this many labelled slides and labels.csv")
    s.add_argument("--width", type=int, default=None,
                   help="level-0 width (default 16384; semi-real 7168)")
    s.add_argument("--height", type=int, default=None, help="level-0 height (default 12288; semi-real 5632)")
    s.add_argument("--mpp", type=float, default=0.25, help="cartoon slides only (semi-real slides have CMU-1's 0.499)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tumour-burden", type=float, default=0.15, help="tumour (lesion) fraction of the tissue (0: none)")
    s.add_argument("--pen-marks", action="store_true")
    s.add_argument("--debris", action="store_true", help="debris specks (semi-real: floaters)")
    s.set_defaults(func=cmd_synthetic)

    e = sub.add_parser("extract", help="encode the patches of slides into feature files (resumable, cached)")
    e.add_argument("slides", nargs="+", help="slide files, folders of slides, or CSVs with a 'path' column")
    e.add_argument("--out", "-o", required=True, help="output folder: patches/ (grids) and features_<encoder>/")
    e.add_argument("--encoder", default="hne_stats", help="encoder name (napari-mil encoders lists them), "
                   "torchscript:PATH or module:pkg.mod:fn")
    e.add_argument("--weights", default=None, help="local weights file for the encoder")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=None, help="patch-reading processes (default: up to 4)")
    e.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="on-disk precision")
    _add_grid_options(e)
    e.set_defaults(func=cmd_extract)

    from napari_mil.training.trainer import TrainConfig  # the defaults shown by --help

    d = TrainConfig()
    tr = sub.add_parser("train", help="train a MIL model (cross-validated) on extracted features")
    tr.add_argument("labels", help="CSV: slide_id,label[,patient_id,split]")
    tr.add_argument("--features", required=True, help="the folder holding features_<encoder>/")
    tr.add_argument("--encoder", default="hne_stats")
    tr.add_argument("--model", default="abmil", help="abmil, abmil_gated, extreme_abmil, transmil, mean_pool, max_pool")
    tr.add_argument("--transmil-dim", type=int, default=None, metavar="N",
                    help="TransMIL: embedding width (default 512; a multiple of --transmil-heads)")
    tr.add_argument("--transmil-heads", type=int, default=None, metavar="N", help="TransMIL: attention heads (default 8)")
    tr.add_argument("--transmil-landmarks", type=int, default=None, metavar="N",
                    help="TransMIL: Nyström landmarks (default 256)")
    tr.add_argument("--mhim", default=None, help="train in MHIM-MIL mode with an official preset "
                    "(camelyon16_abmil, tcga_abmil, camelyon16_transmil, tcga_transmil)")
    tr.add_argument("--mhim-score", choices=("attention", "class_aware"), default="attention",
                    help="how the MHIM-MIL teacher ranks instances: its attention, or MHIM-v2's class-aware score")
    tr.add_argument("--teacher-init", default=None, metavar="CKPT",
                    help="MHIM-MIL: start the teacher from this baseline checkpoint (napari-mil's or an official .pt)")
    tr.add_argument("--teacher", choices=("baseline", "fresh"), default=d.teacher,
                    help="MHIM-MIL: where the teacher starts: a plain baseline trained first with the same settings "
                         "(the official recipe), or a copy of the untrained student (default %(default)s)")
    tr.add_argument("--init-student", choices=("fc", "all", "none"), default=d.init_student,
                    help="MHIM-MIL: what the student takes from the baseline: its instance embedding (the official "
                         "--init_stu_type=fc), everything, or nothing (default %(default)s)")
    tr.add_argument("--mask-ratio-h", type=float, default=None, metavar="R",
                    help="MHIM-MIL: override the preset's share of top-attention instances eligible for masking "
                         "(small bags need more than the official 0.01-0.03)")
    tr.add_argument("--folds", type=int, default=5, help="patient-level folds when the CSV has no split column "
                    "(default %(default)s)")
    tr.add_argument("--epochs", type=int, default=d.epochs, help="at most this many epochs (default %(default)s)")
    tr.add_argument("--min-epochs", type=int, default=d.min_epochs,
                    help="no early stopping and no model selection before this epoch (default %(default)s)")
    tr.add_argument("--patience", type=int, default=d.patience,
                    help="stop after this many epochs without a lower validation loss (default %(default)s)")
    tr.add_argument("--lr", type=float, default=d.lr, help="Adam's learning rate (default %(default)s)")
    tr.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default %(default)s)")
    tr.add_argument("--schedule", choices=("cosine", "constant"), default=d.schedule,
                    help="learning-rate schedule (default %(default)s)")
    tr.add_argument("--normalisation", choices=("global", "slide", "none"), default=d.normalisation,
                    help="feature normalisation fitted on the training bags and kept in the checkpoint "
                         "(default %(default)s)")
    tr.add_argument("--bag-shift", type=float, default=d.bag_shift,
                    help="stain augmentation in feature space: a random offset per training bag, in standard "
                         "deviations of the features (default %(default)s)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--out", "-o", required=True, help="folder for checkpoints, predictions.csv and summary.json")
    tr.add_argument("--quiet", "-q", action="store_true")
    tr.set_defaults(func=cmd_train)

    pr = sub.add_parser(
        "predict", help="predict slides and write their attention with a checkpoint, or out of fold (--oof)",
        description="Predict slides with one checkpoint (SLIDE_ID ... --checkpoint CKPT), or every test slide of a "
                    "cross-validated train run with the checkpoint of the fold that held it out (--oof MODELS_DIR). "
                    "Writes predictions.csv and attention/<slide>.h5 (for export) under --out.")
    pr.add_argument("slides", nargs="*", help="slide ids with features under --features (with --oof: optional, "
                    "a subset of the run's test slides)")
    pr.add_argument("--checkpoint", default=None,
                    help="napari-mil checkpoint (path without .json/.safetensors), or a .pt/.pth/.ckpt file of the "
                         "official TransMIL, MHIM-MIL or CLAM code")
    pr.add_argument("--oof", metavar="MODELS_DIR", default=None,
                    help="out of fold: the --out folder of napari-mil train; each slide in its predictions.csv is "
                         "predicted by its own fold's checkpoint <model>_fold<k>")
    pr.add_argument("--part", choices=("student", "teacher"), default="student",
                    help="the student, or the MHIM-MIL teacher (napari-mil runs keep it in <checkpoint>_teacher; "
                         "an error for checkpoints trained without one)")
    pr.add_argument("--features", required=True)
    pr.add_argument("--encoder", default=None,
                    help="the features' encoder (default: the one the checkpoint was trained on; hne_stats for "
                         "checkpoints that record none)")
    pr.add_argument("--out", "-o", required=True, help="folder for predictions.csv and attention/<slide>.h5")
    pr.add_argument("--quiet", "-q", action="store_true")
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="export an attention file as QuPath GeoJSON, CSV, a PNG overlay or top-k patches")
    ex.add_argument("attention", help="an attention/<slide>.h5 file written by predict")
    ex.add_argument("--out", "-o", required=True)
    ex.add_argument("--formats", default="geojson,csv,png", help="any of geojson,csv,png,topk (default geojson,csv,png)")
    ex.add_argument("--slide", default=None, help="the slide file (needed for topk; sizes the PNG to the slide)")
    ex.add_argument("--downsample", type=float, default=32.0, help="level-0 pixels per PNG pixel (default 32)")
    ex.add_argument("--norm", default="minmax", choices=("raw", "minmax", "rank", "log"))
    ex.add_argument("--colormap", default="inferno", help="a napari colormap name")
    ex.add_argument("--k", type=int, default=8, help="how many top patches (default 8)")
    ex.add_argument("--name", default=None, help="the map's name in the files (default: the file name)")
    ex.add_argument("--quiet", "-q", action="store_true")
    ex.set_defaults(func=cmd_export)

    enc = sub.add_parser("encoders", help="list the available encoders")
    enc.set_defaults(func=cmd_encoders)

    d = sub.add_parser("demo", help="the teaching demo: train MHIM-MIL live and compare teacher and student")
    d.add_argument("--headless", metavar="OUT", default=None,
                   help="run without interaction and write screenshots, exports and summary.json to OUT")
    d.add_argument("--slide", default="synthetic", choices=("synthetic", "cmu1"),
                   help="the slide to map: a held-out synthetic slide with ground truth, or the real CMU-1")
    d.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NapariMilError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
