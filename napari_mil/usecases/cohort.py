"""A cohort of slide files for training: the labels CSV with a ``path`` column, and the features
each slide needs, extracted where missing and reused where cached.

The CSV has ``slide_id``, ``label`` and ``path`` (relative to the CSV's folder or absolute),
optionally ``patient_id`` and ``split``, as ``napari_mil.synthetic.make_cohort`` writes it; the
slide and patient columns may have the other names ``read_labels`` accepts.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from napari_mil.errors import NapariMilError
from napari_mil.features.store import feature_path, stored_geometry
from napari_mil.training.data import CohortError, SlideRecord, label_columns, load_bags, read_labels
from napari_mil.usecases.slide_to_bag import GridSettings, detect, geometry_fits, make_grid


@dataclass
class CohortSlide:
    record: SlideRecord
    path: Path


@dataclass
class CohortProgress:
    done: int  # slides with features
    total: int
    slide_id: str
    extracted: bool  # False: its cached features were reused


def read_cohort(csv_path: str | Path) -> list[CohortSlide]:
    """The CSV's slides with their files; refuses a CSV without paths or naming missing files."""
    csv_path = Path(csv_path)
    records = read_labels(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        slide_column = label_columns(columns, csv_path.name)["slide_id"]
        path_column = next((c for c in columns if c.strip().lower() == "path"), None)
        if path_column is None:
            raise CohortError(f"{csv_path.name} needs a 'path' column with each slide's file "
                              f"(its columns: {', '.join(columns)})")
        paths = {(row[slide_column] or "").strip(): Path((row[path_column] or "").strip()) for row in reader}
    slides, missing = [], []
    for r in records:
        path = paths[r.slide_id] if paths[r.slide_id].is_absolute() else csv_path.parent / paths[r.slide_id]
        (slides if path.is_file() else missing).append(CohortSlide(r, path))
    if missing:
        shown = ", ".join(str(s.path.name) for s in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CohortError(f"{len(missing)} slide file(s) of {csv_path.name} do not exist: {shown}")
    return slides


def ensure_features(slides: list[CohortSlide], encoder, feature_root: str | Path,
                    settings: GridSettings = GridSettings(), num_workers: int = 0,
                    progress: Callable[[CohortProgress], None] | None = None,
                    cancel: Callable[[], bool] | None = None):
    """Features for every slide, then the bags, checked as for training. A slide's feature file
    is reused when it was made by this encoder (name and weights) with the geometry ``settings``
    give on the slide; otherwise tissue is detected and tiled with ``settings`` and the patches
    encoded again (over the old file)."""
    from napari_mil.features.extract import ExtractionCancelled, extract_features
    from napari_mil.slide import open_slide

    for i, item in enumerate(slides):
        if cancel is not None and cancel():
            raise ExtractionCancelled(f"stopped before {item.record.slide_id}; the features extracted so far are kept")
        target = feature_path(feature_root, encoder.name, item.record.slide_id)
        with open_slide(item.path, mpp=settings.mpp) as slide:
            extracted = not _reusable(target, slide, settings, encoder)
            if extracted:
                grid = replace(make_grid(slide, detect(slide, settings), settings), slide_name=item.record.slide_id)
        if extracted:
            extract_features(item.path, grid, encoder, feature_root, num_workers=num_workers, cancel=cancel)
        if progress is not None:
            progress(CohortProgress(i + 1, len(slides), item.record.slide_id, extracted))
    return load_bags([s.record for s in slides], feature_root, encoder.name)


def _reusable(target: Path, slide, settings: GridSettings, encoder) -> bool:
    """Whether the feature file ``target`` holds this encoder's features on the grid ``settings``
    give on ``slide``: features made with other settings or weights are never reused."""
    if not target.exists():
        return False
    try:
        geometry, attrs = stored_geometry(target)
    except NapariMilError:
        return False  # unreadable or without a geometry: encoded again
    same_weights = str(attrs.get("weights_hash", "")) == str(encoder.weights_hash)
    return same_weights and geometry_fits(geometry, slide, settings)
