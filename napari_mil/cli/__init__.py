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

The package parses (parser.py) and prints (output.py); each command (commands.py, train.py,
predict.py) calls the use cases and the core.
"""

from __future__ import annotations

from napari_mil.cli.output import UsageError, error
from napari_mil.cli.parser import build_parser
from napari_mil.errors import NapariMilError, os_error_message

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        error(exc)
        return 2
    except NapariMilError as exc:
        error(exc)
        return 1
    except OSError as exc:  # a file the command could not read or write: its path and what to do
        error(os_error_message(exc))
        return 1
