"""Prediction: a model's probability and attention map over one slide's bag, the MHIM-MIL
teacher's and student's maps side by side, a checkpoint's prediction written as an attention
file, and out-of-fold prediction over a cross-validated ``train`` run (every slide scored by the
model of the fold that held it out).

The CLI's ``predict`` (and ``predict --oof``) and the napari docks call these; the attention
files are ``napari_mil.heatmaps``'s. Models that choose where their attention is read (TransMIL's
layer and head) get the choice as arguments of the call, never as attributes set on the model.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_mil.errors import NapariMilError, os_error_message
from napari_mil.heatmaps import MASK_KINDS, AttentionMap, save_attention
from napari_mil.models.contract import attention_options, bag_tensor
from napari_mil.names import check_name
from napari_mil.training.checkpoints import checkpoint_encoder, load_for_prediction
from napari_mil.training.mhim import class_aware_score, select_masks


def _run(model, x, attention_layer: int | None = None, attention_head: int | None = None):
    """The model's output for a bag tensor, in eval mode and without gradients."""
    model.eval()
    with torch.no_grad():
        return model(x, **attention_options(model, attention_layer, attention_head))


def model_map(model, bag, name: str = "attention", attention_layer: int | None = None,
              attention_head: int | None = None) -> tuple[AttentionMap, np.ndarray]:
    """A model's attention over a whole bag as a map, and its class probabilities (C,).
    ``attention_layer`` and ``attention_head`` choose TransMIL's attention (None: its default)."""
    geometry = bag.geometry  # before the forward: a bag without one fails fast
    out = _run(model, bag_tensor(bag.features, next(model.parameters()).device), attention_layer, attention_head)
    probs = torch.softmax(out.logits.float(), 1)[0].cpu().numpy()
    return AttentionMap.from_geometry(bag.coords, out.attention[0].float().cpu().numpy(), geometry, name), probs


def teacher_student_maps(teacher, student, bag, cfg, mask_ratio_h: float | None = None, seed: int = 0,
                         attention_layer: int | None = None,
                         attention_head: int | None = None) -> tuple[AttentionMap, AttentionMap]:
    """MHIM-MIL's view of one slide: the teacher's attention over every patch, and the student's
    attention over the patches the teacher leaves it (the hard instances); both carry the masks
    the teacher's scores select under ``cfg`` (random-high, low, random). Masked patches get zero
    student attention; ``mask_ratio_h`` is the scheduled value of the step shown. For TransMIL,
    ``attention_layer`` and ``attention_head`` choose the attention of both (None: the teacher's
    layer is ``cfg.attn_layer``, the one it masks with in training, and the student's its default)."""
    geometry = bag.geometry
    x = bag_tensor(bag.features, next(teacher.parameters()).device)
    t_out = _run(teacher, x, cfg.attn_layer if attention_layer is None else attention_layer, attention_head)
    with torch.no_grad():
        scores = t_out.attention if cfg.score == "attention" else class_aware_score(teacher, t_out)
        masks = select_masks(scores[0], cfg, mask_ratio_h, torch.Generator().manual_seed(seed))
    kept = masks.kept
    s_out = _run(student, x[:, kept], attention_layer, attention_head)
    student_values = np.zeros(len(bag.coords))
    student_values[kept.cpu().numpy()] = s_out.attention[0].float().cpu().numpy()
    flags = {kind: getattr(masks, kind).cpu().numpy() for kind in MASK_KINDS}
    teacher_map = AttentionMap.from_geometry(bag.coords, t_out.attention[0].float().cpu().numpy(), geometry,
                                             "teacher", dict(flags))
    student_map = AttentionMap.from_geometry(bag.coords, student_values, geometry, "student", flags)
    return teacher_map, student_map


# ---- a checkpoint's prediction ---------------------------------------------------------------
@dataclass
class SlidePrediction:
    slide_id: str
    probability: float  # of the last class
    predicted: int
    threshold: float
    attention: AttentionMap


def predict_bag(model, meta: dict, bag, slide_id: str, encoder: str | None = None) -> SlidePrediction:
    """One slide's probability and attention map. Refused with a message naming the slide: an
    ID that cannot name a file, empty bags, features of another dimension than the checkpoint's,
    and NaN or infinite features, attention or probabilities (they never become a class)."""
    check_name(slide_id)
    if len(bag) == 0:
        raise NapariMilError(f"{slide_id}: the bag is empty (no patch was extracted)")
    if bag.dim != meta["in_dim"]:
        trained = f" ({meta['encoder']})" if meta.get("encoder") else ""
        raise NapariMilError(f"{slide_id}: {bag.dim}-d {encoder or bag.encoder} features, but the checkpoint expects "
                             f"{meta['in_dim']}-d features{trained}: give --encoder with the encoder it was trained on")
    bad = bag.nonfinite_patches()
    if bad:
        raise NapariMilError(f"{slide_id}: {bad} of {len(bag)} patches have NaN or infinite features, so no class is "
                             "given; extract this slide's features again")
    threshold = _threshold(meta)
    try:
        amap, probs = model_map(model, bag)
    except NapariMilError as exc:
        raise NapariMilError(f"{slide_id}: {exc}") from None
    if not np.isfinite(probs).all():
        raise NapariMilError(f"{slide_id}: the model gives NaN or infinite probabilities, so no class is given; "
                             "is the checkpoint damaged?")
    prob = float(probs[-1])
    return SlidePrediction(slide_id, prob, int(prob >= threshold), threshold, amap)


def _threshold(meta: dict) -> float:
    """The checkpoint's decision threshold: a probability (a NaN one would make every slide class 0)."""
    value = meta.get("threshold", 0.5)
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not 0.0 <= threshold <= 1.0:
        raise NapariMilError(f"the checkpoint's threshold {value!r} is not a probability between 0 and 1")
    return threshold


def attention_path(out: str | os.PathLike, slide_id: str) -> Path:
    """Where ``predict`` puts a slide's attention under its output folder; an ID that would
    reach outside it is an UnsafeNameError."""
    return Path(out) / "attention" / f"{check_name(slide_id)}.h5"


def write_prediction(out: str | Path, pred: SlidePrediction, bag, meta: dict, **attrs) -> Path:
    """The slide's attention file under ``out/attention/``, in the layout ``export`` reads, with
    the model, the probability, the slide's ID and name (``export`` checks the slide it is given
    against them) and ``attrs``."""
    return save_attention(attention_path(out, pred.slide_id), pred.attention,
                          {"model": meta["model"], "probability": pred.probability, "slide_id": pred.slide_id,
                           "name": bag.attrs.get("name"), **attrs})


# ---- out-of-fold prediction ----------------------------------------------------------------
@dataclass
class OOFProgress:
    done: int
    total: int
    slide_id: str
    fold: int


@dataclass
class OOFResult:
    rows: list[dict] = field(default_factory=list)  # one per slide predicted, as predictions.csv
    errors: list[str] = field(default_factory=list)  # one message per slide (or fold) that failed
    notes: list[str] = field(default_factory=list)


def fold_checkpoints(models_dir: str | Path) -> dict[int, Path]:
    """Each fold's checkpoint in a ``train`` output folder: from summary.json where it names them,
    else the ``<model>_fold<k>.json`` files (more than one model per fold is ambiguous)."""
    models_dir = Path(models_dir)
    summary = models_dir / "summary.json"
    if summary.exists():
        try:
            folds = json.loads(summary.read_text()).get("folds", [])
            named = {int(f["fold"]): models_dir / check_name(f["checkpoint"], "checkpoint name")
                     for f in folds if f.get("checkpoint")}
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError, KeyError) as exc:
            raise NapariMilError(f"{summary} is not the summary of a napari-mil train run ({exc})") from None
        if named:
            return named
    found: dict[int, list[Path]] = {}
    for config in sorted(models_dir.glob("*_fold*.json")):
        match = re.fullmatch(r"(.+)_fold(\d+)", config.stem)
        if match:
            found.setdefault(int(match.group(2)), []).append(config.with_suffix(""))
    ambiguous = {k: v for k, v in found.items() if len(v) > 1}
    if ambiguous:
        k, paths = next(iter(ambiguous.items()))
        raise NapariMilError(f"{models_dir} holds several checkpoints for fold {k} ({', '.join(p.name for p in paths)}) "
                             "and no summary.json naming the run's: keep one training run per folder")
    return {k: v[0] for k, v in found.items()}


def read_fold_predictions(models_dir: str | Path) -> list[dict]:
    """The rows of a ``train`` folder's predictions.csv (slide_id, patient_id, fold, label, ...)."""
    path = Path(models_dir) / "predictions.csv"
    if not path.exists():
        raise NapariMilError(f"{path} does not exist: give the --out folder of a cross-validated napari-mil train run")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"slide_id", "fold"} <= set(rows[0]):
        raise NapariMilError(f"{path} has no slide_id and fold columns: it was not written by napari-mil train")
    first_line = {}
    for line, r in enumerate(rows, start=2):
        slide_id, fold = r["slide_id"], (r["fold"] or "").strip()
        if slide_id in first_line:
            raise NapariMilError(f"{path} line {line}: slide {slide_id!r} is listed twice (first on line "
                                 f"{first_line[slide_id]}): it was not written by napari-mil train")
        first_line[slide_id] = line
        if not fold.isdigit():
            raise NapariMilError(f"{path} line {line}: fold {fold!r} is not a fold number")
    return rows


def out_of_fold(models_dir: str | Path, features_root: str | Path, out: str | Path, encoder: str | None = None,
                part: str = "student", slides: list[str] | None = None, device: str = "cpu",
                progress: Callable[[OOFProgress], None] | None = None) -> OOFResult:
    """Score every test slide of a cross-validated run with the checkpoint of the fold that held
    it out, and write its attention to ``out/attention/<slide>.h5``. A slide (or fold) that fails
    is reported in ``errors`` and the others still run. ``slides`` restricts the run to some."""
    from napari_mil.features.store import FeatureBag, feature_path

    rows = read_fold_predictions(models_dir)
    if slides:
        known = {r["slide_id"] for r in rows}
        unknown = [s for s in slides if s not in known]
        if unknown:
            raise NapariMilError(f"not test slides of {Path(models_dir) / 'predictions.csv'}: {', '.join(unknown)}")
        rows = [r for r in rows if r["slide_id"] in set(slides)]
    checkpoints = fold_checkpoints(models_dir)
    result, done = OOFResult(), 0
    by_fold: dict[int, list[dict]] = {}
    for r in rows:
        by_fold.setdefault(int(r["fold"]), []).append(r)
    drift = []
    for k in sorted(by_fold):
        fold_rows = by_fold[k]
        try:
            if k not in checkpoints:
                raise NapariMilError(f"no checkpoint of fold {k} in {models_dir}")
            model, meta = load_for_prediction(checkpoints[k], part=part, device=device)
        except NapariMilError as exc:
            result.errors.append(f"fold {k} ({len(fold_rows)} slides not predicted): {exc}")
            done += len(fold_rows)
            continue
        fold_encoder, note = checkpoint_encoder(meta, encoder)
        if note and note not in result.notes:
            result.notes.append(note)
        for r in fold_rows:
            slide_id = r["slide_id"]
            try:
                bag = FeatureBag.load(feature_path(features_root, fold_encoder, check_name(slide_id)))
                pred = predict_bag(model, meta, bag, slide_id, fold_encoder)
                write_prediction(out, pred, bag, meta, part=part, fold=k, checkpoint=checkpoints[k].name)
                result.rows.append({"slide_id": slide_id, "patient_id": r.get("patient_id", ""), "fold": k,
                                    "label": r.get("label", ""), "probability": f"{pred.probability:.6f}",
                                    "predicted": pred.predicted, "threshold": f"{pred.threshold:.6f}",
                                    "checkpoint": checkpoints[k].name})
                recorded = r.get("probability")
                if part == "student" and recorded and abs(float(recorded) - pred.probability) > 1e-3:
                    drift.append(slide_id)
            except NapariMilError as exc:
                result.errors.append(str(exc))
            except OSError as exc:  # a file this slide's prediction could not write
                result.errors.append(os_error_message(exc))
            done += 1
            if progress is not None:
                progress(OOFProgress(done, len(rows), slide_id, k))
    if drift:
        result.notes.append(f"{len(drift)} slide(s) ({', '.join(drift[:3])}{', ...' if len(drift) > 3 else ''}) get "
                            "another probability than predictions.csv recorded: were the checkpoints or features "
                            "changed after training?")
    return result
