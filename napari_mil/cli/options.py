"""The number options' argparse types: a finite value in a range, or a one-line argparse error
(exit code 2) before any work starts. Each type's ``str`` is its range, shown in --help.

Where the core checks a value itself (GridSettings: the overlap against the patch size, the
plausible µm per pixel; TransMIL's sizes), the type only makes sure it is a finite number and
the core's message says the rest (exit code 1, or 2 before training), as it does in the docks."""

from __future__ import annotations

import argparse
import math

from napari_mil.slide.base import MPP_RANGE
from napari_mil.tiling import MIN_PATCH_SIZE


class Number:
    """An argparse ``type``: text -> a finite ``int`` or ``float`` from ``low`` to ``high``
    (``above``: strictly more than ``low``)."""

    def __init__(self, kind: type = float, low: float | None = None, high: float | None = None, above: bool = False):
        self.kind, self.low, self.high, self.above = kind, low, high, above

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except (TypeError, ValueError, OverflowError):
            value = None
        if value is None or not math.isfinite(value) or not self.contains(value):
            what = "a whole number" if self.kind is int else "a number"
            bounded = self.low is not None or self.high is not None
            raise argparse.ArgumentTypeError(f"{text!r} is not {what + ' ' if bounded else ''}{self}")
        return value

    def contains(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        low, high = _text(self.low), _text(self.high)
        if low is None and high is None:
            return "a whole number" if self.kind is int else "a finite number"
        if low is not None and high is not None and not self.above:
            return f"{low}-{high}"
        parts = [f"{'>' if self.above else '>='} {low}"] if low is not None else []
        return " and ".join(parts + ([f"<= {high}"] if high is not None else []))


def _text(value) -> str | None:
    return None if value is None else str(value) if isinstance(value, int) else f"{value:g}"


POSITIVE = Number(float, 0, above=True)
NON_NEGATIVE = Number(float, 0)
FRACTION = Number(float, 0, 1)
MPP = Number(float, 0, above=True)  # GridSettings then checks the plausible range, MPP_RANGE
MPP_HELP = f"plausible {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g}"
AREA_MM2 = Number(float, 0, 10_000)
INTEGER = Number(int)  # a whole number, its range checked by the core
COUNT = Number(int, 1)  # at least one
WHOLE = Number(int, 0)  # zero or more
PATCH_SIZE = Number(int, MIN_PATCH_SIZE, 65_536)
SATURATION = Number(int, 0, 255)
WORKERS = Number(int, 0, 64)
FOLDS = Number(int, 2)
SEED = Number(int, 0, 2**32 - 1)


def ranged(help_text: str, number: Number, default: bool = True) -> str:
    """``help_text`` with the option's range (and its default)."""
    return f"{help_text} ({number}{'; default %(default)s' if default else ''})"
