"""What every synthetic slide shares: the ground-truth record and its mask files, the pyramidal
TIFF writer, and a cohort's plan and labels CSV."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from napari_mil.atomic import atomic_path, write_csv, write_json

MASK_DOWNSAMPLE = 32  # ground-truth masks: one pixel per 32x32 level-0 pixels


@dataclass
class SyntheticSlide:
    """Where a synthetic slide and its ground truth were written, and what it contains."""

    path: str
    tissue_mask_path: str
    tumour_mask_path: str
    artefact_mask_path: str  # pen strokes and debris on the glass
    width: int
    height: int
    mpp: float
    mask_downsample: int
    seed: int
    tumour_fraction: float  # of the tissue area
    label: int  # 1 when any tumour is present
    pen_marks: bool
    debris: bool  # debris specks (cartoon) or floaters (semi-real) on the glass
    kind: str = "cartoon"  # or "semireal" (napari_mil.synthetic.semireal)
    difficulty: float | None = None  # semi-real: how subtle the lesion is, 0-1
    mimic_mask_path: str = ""  # semi-real: inflammatory clusters, the lesion's mimics
    fold: bool = False
    stain: dict | None = None  # semi-real: the slide's stain changes

    @classmethod
    def load(cls, slide_path: str | os.PathLike) -> SyntheticSlide:
        meta = json.loads(Path(slide_path).with_suffix(".json").read_text())
        return cls(**{k: v for k, v in meta.items() if k in cls.__dataclass_fields__})

    def tissue_mask(self) -> np.ndarray:
        return read_mask_png(self.tissue_mask_path) > 127

    def tumour_mask(self) -> np.ndarray:
        return read_mask_png(self.tumour_mask_path) > 127

    def artefact_mask(self) -> np.ndarray:
        return read_mask_png(self.artefact_mask_path) > 127

    def mimic_mask(self) -> np.ndarray:
        if not self.mimic_mask_path:
            return np.zeros_like(self.tissue_mask())
        return read_mask_png(self.mimic_mask_path) > 127


def read_mask_png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray((mask > 0).astype(np.uint8) * 255).save(tmp, format="PNG")


def write_pyramid(path: Path, render, rows: int, cols: int, tile: int, width: int, height: int, mpp: float,
                  jpeg_quality: int = 80, workers: int | None = None) -> None:
    """Write a pyramidal JPEG TIFF atomically from ``render(index) -> (tile, tile, 3) uint8``,
    called for each tile in row-major order (rows are rendered in parallel threads, a row at a
    time, which bounds the memory in flight). Levels downsample by 4 down to ~512 px."""
    import tifffile
    from PIL import Image

    level_ds = [1]
    while max(width, height) / (level_ds[-1] * 4) >= 512 and len(level_ds) < 6:
        level_ds.append(level_ds[-1] * 4)
    level1_ds = level_ds[1] if len(level_ds) > 1 else None
    level1 = np.empty((rows * tile // level1_ds, cols * tile // level1_ds, 3), np.uint8) if level1_ds else None

    def render_and_reduce(index: int) -> np.ndarray:
        out = render(index)
        if level1 is not None:
            ty, tx = divmod(index, cols)
            f = level1_ds
            level1[ty * tile // f : (ty + 1) * tile // f, tx * tile // f : (tx + 1) * tile // f] = \
                np.asarray(Image.fromarray(out).reduce(f))
        return out

    workers = workers or min(4, os.cpu_count() or 1)

    def tiles():
        with ThreadPoolExecutor(workers) as pool:
            for r in range(rows):
                yield from pool.map(render_and_reduce, range(r * cols, (r + 1) * cols))

    res = 1e4 / mpp  # pixels per centimetre
    # RGB photometric interpretation, as Aperio writes: OpenSlide shows YCbCr JPEG tiles in wrong colours
    options = dict(
        photometric="rgb", compression="jpeg", compressionargs={"level": jpeg_quality}, resolutionunit="CENTIMETER"
    )
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 2**31) as tw:
            tw.write(
                tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile),
                resolution=(res, res), subfiletype=0, maxworkers=workers, **options,
            )
            if level1 is not None:
                prev = level1[: height // level1_ds, : width // level1_ds]
                for i, f in enumerate(level_ds[1:]):
                    if i > 0:
                        h2, w2 = prev.shape[0] // 4 * 4, prev.shape[1] // 4 * 4
                        prev = prev[:h2, :w2].reshape(h2 // 4, 4, w2 // 4, 4, 3).mean(axis=(1, 3)).astype(np.uint8)
                    tw.write(
                        np.ascontiguousarray(prev), tile=(256, 256), resolution=(res / f, res / f),
                        subfiletype=1, maxworkers=workers, **options,
                    )


def cohort_plan(rng: np.random.Generator, n_slides: int, positive_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled slide labels and patient numbers: slides of one label paired into patients, as
    when a patient has two blocks scanned."""
    n_pos = int(round(n_slides * positive_fraction))
    labels = np.array([1] * n_pos + [0] * (n_slides - n_pos))
    rng.shuffle(labels)
    patient_of = np.empty(n_slides, int)
    next_id = 0
    for label in (1, 0):
        members = np.flatnonzero(labels == label)
        patient_of[members] = next_id + np.arange(len(members)) // 2
        next_id += (len(members) + 1) // 2
    return labels, patient_of


def write_ground_truth(path: Path, masks: dict[str, np.ndarray], **fields) -> SyntheticSlide:
    """The masks beside the slide (``<stem>.<name>.png`` for tissue, tumour, artefacts and,
    when given, mimics) and ``<stem>.json`` with the record; returns the record. ``fields`` are
    the record's other values; the tumour fraction and the label follow from the masks."""
    stem = Path(path).with_suffix("")
    pngs = {name: Path(f"{stem}.{name}.png") for name in masks}
    for name, mask in masks.items():
        write_mask_png(pngs[name], mask)
    tissue, tumour = masks["tissue"], masks["tumour"]
    info = SyntheticSlide(path=str(path), tissue_mask_path=str(pngs["tissue"]), tumour_mask_path=str(pngs["tumour"]),
                          artefact_mask_path=str(pngs["artefacts"]), mimic_mask_path=str(pngs.get("mimics", "")),
                          tumour_fraction=float(tumour.sum() / max(tissue.sum(), 1)), label=int(tumour.any()), **fields)
    write_json(Path(path).with_suffix(".json"), asdict(info))
    return info


def cohort_row(slide_id: str, info: SyntheticSlide, patient: int) -> dict:
    """A slide's row of a cohort's labels.csv."""
    return {"slide_id": slide_id, "path": f"{slide_id}.tif", "label": info.label,
            "patient_id": f"patient_{patient:03d}", "tumour_fraction": f"{info.tumour_fraction:.5f}"}


def write_labels(folder: Path, rows: list[dict]) -> Path:
    """``folder/labels.csv`` from the cohort's rows, atomically; returns its path."""
    return write_csv(folder / "labels.csv", rows)
