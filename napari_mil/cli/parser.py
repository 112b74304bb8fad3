"""The command line's arguments: one subcommand per use case, its defaults from the core."""

from __future__ import annotations

import argparse

from napari_mil import __version__
from napari_mil.encoders import DEFAULT_ENCODER
from napari_mil.exports import COLORMAPS
from napari_mil.usecases.slide_to_bag import GridSettings

DESCRIPTION = "Command line: the same core functions as the napari docks."


def _add_grid_options(p: argparse.ArgumentParser) -> None:
    """The tissue and grid options, with GridSettings' defaults."""
    from napari_mil.tissue import PRESETS

    d = GridSettings()
    target = p.add_mutually_exclusive_group()
    target.add_argument("--magnification", type=float, default=d.magnification,
                        help="target magnification (default %(default)g)")
    target.add_argument("--target-mpp", type=float, default=d.target_mpp,
                        help="target µm per pixel instead of a magnification")
    p.add_argument("--patch-size", type=int, default=d.patch_size,
                   help="patch side in pixels at the target (default %(default)s)")
    p.add_argument("--overlap", type=int, default=d.overlap,
                   help="pixels shared by neighbouring patches (default %(default)s)")
    p.add_argument("--min-tissue", type=float, default=d.min_tissue,
                   help="minimum tissue fraction per patch (default %(default)s)")
    p.add_argument("--preset", choices=list(PRESETS), default=d.preset)
    p.add_argument("--saturation-threshold", type=int, default=d.saturation_threshold, help="0-255; default Otsu")
    p.add_argument("--min-tissue-area", type=float, default=None, help="smallest tissue piece kept, mm²")
    p.add_argument("--mpp", type=float, default=d.mpp, help="µm per pixel for slides that record none")
    p.add_argument("--quiet", "-q", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from napari_mil.cli.commands import cmd_demo, cmd_encoders, cmd_export, cmd_extract, cmd_synthetic, cmd_tile
    from napari_mil.cli.predict import cmd_predict
    from napari_mil.cli.train import cmd_train

    parser = argparse.ArgumentParser(prog="napari-mil", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"napari-mil {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tile", help="detect tissue and write masks, patch grids and previews")
    t.add_argument("slides", nargs="+", help="slide files, folders of slides, or CSVs with a 'path' column")
    t.add_argument("--out", "-o", required=True, help="output folder (masks/, patches/, previews/)")
    _add_grid_options(t)
    t.set_defaults(func=cmd_tile)

    from napari_mil.synthetic.semireal import DEFAULT_DIFFICULTY

    s = sub.add_parser("synthetic", help="write a synthetic H&E slide (or a cohort) with ground truth",
                       description="Cartoon slides (easy: every model separates them) or, with --semireal, slides "
                                   "of real H&E texture with subtle nuclear-atypia lesions, stain variation and "
                                   "mimics, for learning that is not trivial.")
    s.add_argument("out", help="output .tif (or a folder with --cohort)")
    s.add_argument("--semireal", action="store_true", help="semi-real slides (napari_mil.synthetic.semireal) instead of cartoons")
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
    e.add_argument("--encoder", default=DEFAULT_ENCODER, help="encoder name (napari-mil encoders lists them), "
                   "torchscript:PATH or module:pkg.mod:fn")
    e.add_argument("--weights", default=None, help="local weights file for the encoder")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=None, help="patch-reading processes (default: up to 4)")
    e.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="on-disk precision")
    _add_grid_options(e)
    e.set_defaults(func=cmd_extract)

    from napari_mil.models import list_models
    from napari_mil.training.trainer import TrainConfig  # the defaults shown by --help

    d = TrainConfig()
    tr = sub.add_parser("train", help="train a MIL model (cross-validated) on extracted features")
    tr.add_argument("labels", help="CSV: slide_id,label[,patient_id,split]")
    tr.add_argument("--features", required=True, help="the folder holding features_<encoder>/")
    tr.add_argument("--encoder", default=DEFAULT_ENCODER, help="the features' encoder (default %(default)s)")
    tr.add_argument("--model", default="abmil", choices=list_models(), help="the MIL model (default %(default)s)")
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
                    help="the features' encoder (default: the one the checkpoint was trained on; "
                         f"{DEFAULT_ENCODER} for checkpoints that record none)")
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
    ex.add_argument("--colormap", default="inferno", choices=COLORMAPS, help="the colour map (default %(default)s)")
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
