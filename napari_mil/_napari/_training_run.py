"""What the Retrain dock's worker runs, away from Qt: the cohort's features, then the
cross-validation ``napari-mil train`` runs (``usecases.cross_validation``), reporting typed
updates for the GUI thread, and the model to view at the end."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CohortUpdate:
    """Features ready for one more slide of the cohort."""

    progress: Any  # usecases.cohort.CohortProgress


@dataclass(frozen=True)
class WarningsUpdate:
    """Warnings before training starts (MHIM-MIL masks too small for the cohort's bags)."""

    messages: list[str]


@dataclass(frozen=True)
class FoldsUpdate:
    """The folds are made: how many, and the fold whose model is viewed at the end."""

    n_folds: int
    single_split: bool  # the CSV's own split, not folds
    viewed_fold: int  # the fold holding the open slide out, else 0
    open_role: str | None  # the open slide's part in that fold (train, val, test), None when not in the cohort


@dataclass(frozen=True)
class EpochUpdate:
    """An epoch of one fold, with the open slide's teacher | student maps when there are any."""

    fold: int
    report: Any  # training.trainer.EpochReport
    maps: tuple | None  # (teacher, student) heatmaps.AttentionMap


@dataclass(frozen=True)
class FoldDoneUpdate:
    """A fold trained and its test slides predicted."""

    result: Any  # usecases.cross_validation.FoldResult


@dataclass(frozen=True)
class TrainingJob:
    """Everything a training needs, captured when Train is pressed."""

    slides: list  # usecases.cohort.CohortSlide
    config: Any  # training.trainer.TrainConfig, its MHIM-MIL settings included
    folds: int  # patient-level folds when the CSV has no split column
    feature_root: Path
    out: Path  # checkpoints, predictions.csv, summary.json
    encoder: str
    open_bag: Any = None  # the open slide's FeatureBag, for the live maps
    open_slide: Path | None = None  # the open slide's file, to find it in the cohort


@dataclass(frozen=True)
class TrainingOutcome:
    cv: Any  # usecases.cross_validation.CrossValidationResult
    viewed: Any  # the FoldResult whose model is viewed
    open_role: str | None  # as in FoldsUpdate
    model: Any  # the viewed fold's model, on the CPU, and its checkpoint's metadata and teacher
    meta: dict
    teacher: Any


@contextlib.contextmanager
def leaving_a_core():
    """Torch's intra-op threads limited to the cores less one while the block runs, then restored.

    Training a MIL model steps one bag at a time: small operations, where all-core thread pools
    gain little and lose much when another thread wants a core. In the viewer, the GUI thread
    (and its software OpenGL) does: on two cores, epochs of the teaching demo were several times
    slower with two torch threads than with one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 2) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _same_file(a: Path, b: Path | None) -> bool:
    try:
        return b is not None and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def open_slide_fold(slides: list, folds: list[dict], open_slide: Path | None) -> tuple[int, str | None]:
    """(the fold to view, the open slide's part in it): the fold whose test set holds the open
    slide when it is in the cohort (an out-of-fold view), else fold 0."""
    index = next((i for i, s in enumerate(slides) if _same_file(s.path, open_slide)), None)
    if index is None:
        return 0, None
    fold = next((k for k, f in enumerate(folds) if index in f.get("test", [])), 0)
    role = next((name for name in ("train", "val", "test") if index in folds[fold].get(name, [])), None)
    return fold, role


def maps_now(holder: dict, bag, mhim_cfg):
    """The open slide's teacher | student maps between two epochs (in the training thread)."""
    from napari_mil.usecases.prediction import teacher_student_maps

    model, mhim = holder.get("model"), holder.get("mhim")
    if bag is None or model is None or mhim is None:
        return None
    was_training = model.training
    try:
        return teacher_student_maps(mhim.teacher, model, bag, mhim_cfg, mhim.current_ratio_h(), 0)
    finally:
        model.train(was_training)


def run_training(job: TrainingJob, report: Callable[[Any], None], cancel: Callable[[], bool]) -> TrainingOutcome:
    """The cohort's features (extracted where missing), the folds (the CSV's split, or ``job.folds``
    patient-level folds with the configuration's seed: those of ``napari-mil train``), every fold
    trained and tested by ``cross_validate``; then the viewed fold's model, teacher and metadata."""
    from napari_mil.encoders import create_encoder
    from napari_mil.training.checkpoints import load_checkpoint, load_teacher
    from napari_mil.training.trainer import mhim_bag_size_warnings
    from napari_mil.usecases.cohort import ensure_features
    from napari_mil.usecases.cross_validation import cross_validate, make_folds

    cfg = job.config
    with leaving_a_core():
        encoder = create_encoder(job.encoder, device="auto")
        bags = ensure_features(job.slides, encoder, job.feature_root, progress=lambda p: report(CohortUpdate(p)),
                               cancel=cancel)
        folds = make_folds([s.record for s in job.slides], bags, job.folds, cfg.seed)
        viewed, role = open_slide_fold(job.slides, folds, job.open_slide)
        report(FoldsUpdate(len(folds), all(s.record.split for s in job.slides), viewed, role))
        report(WarningsUpdate(mhim_bag_size_warnings(cfg.mhim, bags) if cfg.mhim is not None else []))
        holder: dict = {}
        cv = cross_validate(
            bags, folds, cfg, job.out, extra_meta={"encoder": job.encoder}, cancel=cancel,
            on_start=lambda k, model, mhim: holder.update(model=model, mhim=mhim),
            on_epoch=lambda k, r: report(EpochUpdate(k, r, maps_now(holder, job.open_bag, cfg.mhim))),
            on_fold=lambda fold: report(FoldDoneUpdate(fold)))
    shown = cv.folds[viewed]
    _, meta = load_checkpoint(shown.result.checkpoint)
    teacher = load_teacher(shown.result.checkpoint, meta)  # the best epoch's, as the student
    return TrainingOutcome(cv, shown, role, shown.result.model.cpu().eval(), meta, teacher)
