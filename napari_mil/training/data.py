"""Cohorts for training: a labels CSV, bags from the feature store, patient-level splits.

The CSV has one row per slide: ``slide_id`` and ``label`` (integers 0..C-1), optionally
``patient_id`` (defaults to the slide) and ``split`` (train/val/test, which overrides the
cross-validation). The column names of CLAM and TRIDENT (``slide_id``, ``case_id``, ``label``)
are read as they are, and so are ``slide`` and ``patient``/``patient_id`` (``COLUMN_ALIASES``).
Slide IDs are unique and safe file names, since they name the feature and attention files.
Bags are read from ``<features>/features_<encoder>/<slide_id>.h5`` and held in memory.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_mil.errors import NapariMilError
from napari_mil.features.store import FeatureBag, feature_path
from napari_mil.names import unsafe_name


class CohortError(NapariMilError):
    """A labels file or a set of bags that cannot be trained on."""


@dataclass
class SlideRecord:
    slide_id: str
    label: int
    patient_id: str
    split: str = ""


@dataclass(eq=False)
class Bag:
    slide_id: str
    label: int
    patient_id: str
    features: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2)


# the accepted names of each column, first match wins (compared without case or surrounding spaces)
COLUMN_ALIASES = {
    "slide_id": ("slide_id", "slide"),
    "label": ("label",),
    "patient_id": ("patient_id", "case_id", "patient"),
    "split": ("split",),
}


def label_columns(columns: list[str], where: str = "the labels CSV") -> dict[str, str]:
    """The CSV's column for each role (``slide_id``, ``label``, ``patient_id``, ``split``; the
    last two may be absent); a CSV without a slide or label column gets a CohortError that lists
    the columns it has and the names accepted."""
    found = {c.strip().lower(): c for c in columns if c is not None}
    chosen = {}
    for role, names in COLUMN_ALIASES.items():
        column = next((found[n] for n in names if n in found), None)
        if column is not None:
            chosen[role] = column
    missing = [role for role in ("slide_id", "label") if role not in chosen]
    if missing:
        accepted = "; ".join(f"{role}: {' or '.join(COLUMN_ALIASES[role])}" for role in COLUMN_ALIASES)
        has = ", ".join(repr(c) for c in columns) if columns else "none (an empty file?)"
        raise CohortError(f"{where} needs a {' and a '.join(repr(m) for m in missing)} column. Its columns: {has}. "
                          f"Accepted names: {accepted} (the last two optional)")
    return chosen


def unsafe_slide_id(slide_id: str) -> str | None:
    """Why ``slide_id`` cannot name a file (None when it can): IDs become file names."""
    return unsafe_name(slide_id)


def read_labels(path: str | Path) -> list[SlideRecord]:
    """Slides and labels; raises CohortError for missing columns, non-integer or single-class
    labels, duplicate slide IDs and slide IDs that are not safe file names."""
    path = Path(path)
    if not path.exists():
        raise CohortError(f"labels file {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(fh)
        col = label_columns(reader.fieldnames or [], path.name)
        records, first_line = [], {}
        for line, row in enumerate(reader, start=2):
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # a blank line
            slide_id = (row[col["slide_id"]] or "").strip()
            why = unsafe_slide_id(slide_id)
            if why:
                raise CohortError(f"{path.name} line {line}: slide ID {slide_id!r} cannot name a file ({why}); "
                                  "slide IDs are the feature files' names without .h5")
            if slide_id in first_line:
                raise CohortError(f"{path.name} line {line}: slide {slide_id!r} is listed twice (first on line "
                                  f"{first_line[slide_id]}); a slide in two folds leaks between training and test. "
                                  "List each slide once; patient_id groups the slides of one patient")
            first_line[slide_id] = line
            raw = (row[col["label"]] or "").strip()
            try:
                label = int(raw)
                if label < 0:
                    raise ValueError
            except ValueError:
                raise CohortError(f"{path.name} line {line}: label {raw!r} is not a class number (0, 1, ...)") from None
            split = (row[col["split"]] or "").strip().lower() if "split" in col else ""
            if split not in ("", "train", "val", "test"):
                raise CohortError(f"{path.name} line {line}: split {split!r} must be train, val or test")
            patient = ((row[col["patient_id"]] or "").strip() if "patient_id" in col else "") or slide_id
            records.append(SlideRecord(slide_id, label, patient, split))
    if not records:
        raise CohortError(f"{path.name} lists no slides")
    classes = sorted({r.label for r in records})
    if len(classes) < 2:
        raise CohortError(f"{path.name} has only class {classes[0]}: training needs at least two classes")
    if classes != list(range(len(classes))):
        raise CohortError(f"{path.name}: labels {classes} must be consecutive class numbers from 0")
    return records


def load_bags(records: list[SlideRecord], features_root: str | Path, encoder: str) -> list[Bag]:
    """Read every slide's bag; missing files, empty bags and NaN features are refused up front."""
    missing = [r.slide_id for r in records if not feature_path(features_root, encoder, r.slide_id).exists()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CohortError(
            f"{len(missing)} slide(s) in the labels have no {encoder} features under {features_root}: {shown}; "
            "run napari-mil extract on them first"
        )
    bags, dims = [], set()
    for r in records:
        bag = FeatureBag.load(feature_path(features_root, encoder, r.slide_id))
        if len(bag) == 0:
            raise CohortError(f"{r.slide_id}: the bag is empty (no patch was extracted)")
        features = bag.widened().features
        bad = bag.nonfinite_patches()
        if bad:
            raise CohortError(f"{r.slide_id}: {bad} patches have NaN or infinite features; re-extract this slide")
        dims.add(features.shape[1])
        bags.append(Bag(r.slide_id, r.label, r.patient_id, features, bag.coords))
    if len(dims) > 1:
        raise CohortError(f"bags have different feature dimensions {sorted(dims)}: mixed encoders?")
    return bags


def patient_folds(bags: list[Bag], k: int, seed: int = 0, val_fraction: float = 0.2) -> list[dict[str, np.ndarray]]:
    """Patient-level stratified k-fold: each fold's test patients are held out, and a stratified
    ``val_fraction`` of the remaining patients validates (early stopping, threshold). No
    patient is ever in two of train/val/test."""
    rng = np.random.default_rng(seed)
    patients = sorted({b.patient_id for b in bags})
    # a patient with slides of several labels is stratified by its highest label
    label_of = {p: max(b.label for b in bags if b.patient_id == p) for p in patients}
    groups: dict[int, list[str]] = {}
    for p in patients:
        groups.setdefault(label_of[p], []).append(p)
    test_of: dict[str, int] = {}
    for members in groups.values():
        members = list(members)
        rng.shuffle(members)
        for i, p in enumerate(members):
            test_of[p] = i % k
    folds = []
    for f in range(k):
        rest = {label: [p for p in members if test_of[p] != f] for label, members in groups.items()}
        val = set()
        for members in rest.values():
            members = list(members)
            rng.shuffle(members)
            val |= set(members[: max(1, int(round(val_fraction * len(members))))] if len(members) > 1 else [])
        index = {name: [] for name in ("train", "val", "test")}
        for i, b in enumerate(bags):
            name = "test" if test_of[b.patient_id] == f else "val" if b.patient_id in val else "train"
            index[name].append(i)
        folds.append({name: np.array(v, int) for name, v in index.items()})
    return folds
