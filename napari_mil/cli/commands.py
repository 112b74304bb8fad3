"""The slide commands (tile, extract), export, encoders, synthetic and demo: each calls the
core and prints."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from napari_mil.atomic import write_csv
from napari_mil.cli.output import TileBar, error, failure, output_folder, progress_bar, warning, write_line
from napari_mil.errors import NapariMilError, os_error_message
from napari_mil.usecases.slide_to_bag import (
    GridSettings,
    expand_inputs,
    slide_to_bag,
    tile_slide,
    write_extract_manifest,
)


def grid_settings(args) -> GridSettings:
    """The grid options (parser.py) as GridSettings, checked: nonsense raises NapariMilError."""
    return GridSettings(
        magnification=args.magnification, target_mpp=args.target_mpp, patch_size=args.patch_size,
        overlap=args.overlap, min_tissue=args.min_tissue, preset=args.preset,
        saturation_threshold=args.saturation_threshold,
        min_tissue_area_um2=None if args.min_tissue_area is None else args.min_tissue_area * 1e6, mpp=args.mpp,
    )


def _slides(args) -> list[tuple[Path, float | None]] | None:
    """The slides the inputs name, or None after an error (the command returns 2)."""
    try:
        slides = expand_inputs(args.slides)
    except NapariMilError as exc:
        error(exc)
        return None
    if not slides:
        error("no slide files found in the given inputs")
        return None
    return slides


def cmd_tile(args) -> int:
    settings = grid_settings(args)
    slides = _slides(args)
    if slides is None:
        return 2
    out = output_folder(args.out)
    failures = 0
    rows = []
    for path, mpp in progress_bar(slides, desc="tiling", unit="slide", disable=args.quiet or len(slides) == 1):
        try:
            result = tile_slide(path, out, settings, mpp)
            rows.append({"slide": str(path), "patches": result.patches,
                         "tissue_fraction": f"{result.tissue_fraction:.4f}", "error": ""})
            if not args.quiet:
                write_line(f"{path.name}: {result.patches} patches, tissue {result.tissue_fraction:.1%}")
        except (NapariMilError, OSError) as exc:
            failures += 1
            rows.append({"slide": str(path), "patches": 0, "tissue_fraction": "", "error": failure(exc)})
            write_line(f"error: {failure(exc)}", file=sys.stderr)
    write_csv(out / "tiling_summary.csv", rows)
    return 1 if failures else 0


def cmd_extract(args) -> int:
    import warnings

    from napari_mil.encoders import create_encoder

    settings = grid_settings(args)
    try:
        slides = expand_inputs(args.slides)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            encoder = create_encoder(args.encoder, weights=args.weights, device=args.device)
        for w in caught:
            warning(w.message)
        out = output_folder(args.out)
    except NapariMilError as exc:
        error(exc)
        return 2
    runs, failures = [], 0
    for path, mpp in slides:
        t0 = time.perf_counter()
        bar = TileBar(path.name, disable=args.quiet)
        try:
            result = slide_to_bag(path, encoder, out, settings, mpp=mpp, batch_size=args.batch_size,
                                  num_workers=args.workers, dtype=args.dtype, progress=bar)
            bar.close()
            state = "cached" if result.cached else (f"resumed at {result.resumed_from}" if result.resumed_from else "extracted")
            if not args.quiet:
                write_line(f"{path.name}: {len(result.bag)} x {result.bag.dim} features, {state}, "
                           f"{result.seconds:.1f} s" + (f", {result.skipped} unreadable patches skipped" if result.skipped else ""))
            runs.append({"slide": str(path), "features": str(result.path), "patches": len(result.bag),
                         "state": state, "seconds": round(result.seconds, 3), "tiles_per_s": round(result.tiles_per_s, 1),
                         "skipped": result.skipped, "batch_size": result.batch_size})
        except (NapariMilError, OSError) as exc:
            bar.close()
            failures += 1
            runs.append({"slide": str(path), "error": failure(exc), "seconds": round(time.perf_counter() - t0, 3)})
            write_line(f"error: {failure(exc)}", file=sys.stderr)
    try:
        write_extract_manifest(out, encoder, {k: v for k, v in vars(args).items() if k not in ("func", "slides")}, runs)
    except OSError as exc:
        error(f"the manifest was not written: {os_error_message(exc)}")
        return 1
    return 1 if failures else 0


def cmd_export(args) -> int:
    """Attention files (from predict) -> QuPath GeoJSON, per-patch CSV, PNG overlay, top-k PNGs."""
    from napari_mil.exports import export_attention_file, export_formats

    try:
        formats = export_formats(args.formats)
    except NapariMilError as exc:
        error(exc)
        return 2
    if "topk" in formats and not args.slide:
        error("the top-k patches are read from the slide: give --slide")
        return 2
    try:
        written = export_attention_file(args.attention, args.out, formats, slide_path=args.slide,
                                        downsample=args.downsample, norm=args.norm, colormap=args.colormap, k=args.k,
                                        name=args.name, max_pixels=args.max_pixels, force=args.force)
    except (NapariMilError, OSError) as exc:
        error(failure(exc))
        return 1
    if not args.quiet:
        for path in written:
            print(path)
    return 0


def cmd_encoders(args) -> int:
    from napari_mil.encoders import DEFAULT_ENCODER, list_encoders

    for spec in list_encoders():
        mark = " (default)" if spec.name == DEFAULT_ENCODER else ""
        dim = f"{spec.dim}-d" if spec.dim else "?-d"
        needs = f"  [needs {spec.needs}]" if spec.needs else ""
        print(f"{spec.name:16s} {dim:>7s}  {spec.description}{mark}{needs}")
    return 0


def cmd_synthetic(args) -> int:
    from napari_mil.synthetic import make_cohort, make_synthetic_slide

    try:
        if args.semireal:
            from napari_mil.synthetic.semireal import make_semireal_cohort, make_semireal_slide

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
        error(failure(exc))
        return 2
    return 0


def cmd_demo(args) -> int:
    from napari_mil._napari._demo import run_demo  # Qt is imported only here

    summary = run_demo(headless=args.headless, slide=args.slide, epochs=args.epochs)
    if args.headless:
        print(json.dumps(summary, indent=2))
    return 0
