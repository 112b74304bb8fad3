"""Training a MIL model on in-memory bags, plainly or in MHIM-MIL mode, with checkpoints.

One bag per step (bags differ in size), Adam with weight decay, class-weighted cross-entropy,
early stopping on validation loss, deterministic seeds, AMP on CUDA. Progress, live metrics
and cooperative cancel go through callbacks, which is how the GUI drives it. Checkpoints are a
safetensors file of weights plus a JSON file of the configuration; the best epoch's is written
atomically whenever validation improves, so a cancel keeps the last good one.
"""

from __future__ import annotations

import functools
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_mil.errors import NapariMilError
from napari_mil.models import create_model
from napari_mil.training.metrics import binary_metrics, choose_threshold
from napari_mil.training.mhim import MHIMConfig, MHIMTrainer


class TrainingCancelled(NapariMilError):
    """Training stopped on request; the best checkpoint so far is kept."""


class CheckpointError(NapariMilError):
    """A checkpoint that does not exist, is not ours, or does not fit the features."""


@dataclass
class TrainConfig:
    model: str = "abmil"
    model_cfg: dict = field(default_factory=dict)
    epochs: int = 30
    lr: float = 2e-4
    weight_decay: float = 1e-4
    patience: int = 8  # epochs without validation improvement before stopping
    class_weighting: bool = True
    seed: int = 0
    mhim: MHIMConfig | None = None
    # MHIM-MIL: the teacher starts from this baseline checkpoint (napari-mil's or an official
    # .pt) instead of the student's initialisation; the student takes the baseline's architecture
    teacher_init: str | None = None
    device: str = "auto"
    amp: bool = True  # on CUDA only


@dataclass
class EpochReport:
    epoch: int
    train_loss: float
    val_loss: float
    val_auc: float
    seconds: float
    mask_ratio: float  # share of instances the student did not see (0 without MHIM)


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list[EpochReport]
    best_epoch: int
    threshold: float  # chosen on validation (Youden's J)
    val_metrics: dict
    checkpoint: Path | None
    mhim: MHIMTrainer | None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def predict_probs(model, bags, device) -> tuple[np.ndarray, float]:
    """Positive-class probabilities (or class probabilities for C > 2) and the mean loss."""
    model.eval()
    probs, losses = [], []
    with torch.no_grad():
        for bag in bags:
            out = model(torch.from_numpy(bag.features)[None].to(device))
            losses.append(F.cross_entropy(out.logits.float(), torch.tensor([bag.label], device=device)).item())
            probs.append(torch.softmax(out.logits.float(), 1)[0].cpu().numpy())
    return np.stack(probs), float(np.mean(losses))


def _releases_gpu_memory(fn):
    """When ``fn`` returns or fails (a cancel included), the GPU memory it held goes back to the
    driver: the frames of a failure are cleared first, so that their tensors are freed."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    return wrapper


@_releases_gpu_memory
def train(train_bags, val_bags, cfg: TrainConfig, checkpoint: str | Path | None = None,
          on_epoch: Callable[[EpochReport], None] | None = None, cancel: Callable[[], bool] | None = None,
          extra_meta: dict | None = None, on_start: Callable | None = None) -> TrainResult:
    """Train ``cfg.model`` on the training bags, early-stopping on the validation bags.

    ``on_start(model, mhim)`` receives the model (and the MHIMTrainer, or None) before the first
    epoch; ``on_epoch(report)`` runs after each epoch, between optimiser steps, so it may read
    the models safely (the GUI draws its live maps there); ``cancel()`` is polled before each bag."""
    if not train_bags or not val_bags:
        raise NapariMilError("training needs at least one training and one validation slide")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = _device(cfg.device)
    in_dim = train_bags[0].features.shape[1]
    n_classes = int(max(b.label for b in train_bags + val_bags)) + 1
    model_cfg, teacher_state = cfg.model_cfg, None
    if cfg.teacher_init:
        if cfg.mhim is None:
            raise NapariMilError("a teacher initialisation needs MHIM-MIL mode (choose a preset)")
        baseline, base_meta = load_checkpoint(cfg.teacher_init, feature_dim=in_dim)
        if base_meta["model"] != cfg.model or base_meta["n_classes"] != n_classes:
            raise CheckpointError(f"the teacher's baseline is a {base_meta['model']} with {base_meta['n_classes']} "
                                  f"classes; train a {base_meta['model']} on {base_meta['n_classes']} classes with it")
        model_cfg, teacher_state = base_meta.get("model_cfg", {}), baseline.state_dict()
    model = create_model(cfg.model, in_dim, n_classes, **model_cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    counts = np.bincount([b.label for b in train_bags], minlength=n_classes).astype(np.float64)
    weight = torch.tensor(counts.sum() / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device) \
        if cfg.class_weighting else None
    mhim = MHIMTrainer(model, cfg.mhim, cfg.epochs * len(train_bags), teacher_state, seed=cfg.seed) if cfg.mhim else None
    use_amp = cfg.amp and device.type == "cuda"
    if on_start is not None:
        on_start(model, mhim)
    history, best_loss, best_epoch, best_state, stale = [], float("inf"), -1, None, 0
    meta = {"train_config": _jsonable(asdict(cfg)), "model": cfg.model, "model_cfg": model_cfg,
            "in_dim": in_dim, "n_classes": n_classes, **(extra_meta or {})}
    if mhim is not None and checkpoint is not None:
        meta["teacher"] = teacher_path(checkpoint).name
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        losses, masked = [], []
        for i in rng.permutation(len(train_bags)):
            if cancel is not None and cancel():
                raise TrainingCancelled(f"training cancelled in epoch {epoch + 1}; best checkpoint kept"
                                        + (f" at {checkpoint}" if checkpoint and best_epoch >= 0 else ""))
            bag = train_bags[i]
            x = torch.from_numpy(bag.features)[None].to(device)  # (1, N, D)
            y = torch.tensor([bag.label], device=device)
            with torch.autocast(device.type, enabled=use_amp):
                if mhim is not None:
                    loss, _, masks = mhim.loss(x, y, weight)
                    masked.append(float(masks.masked.float().mean()))
                else:
                    loss = F.cross_entropy(model(x).logits.float(), y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if mhim is not None:
                mhim.after_optimizer_step()
            losses.append(loss.item())
        probs, val_loss = predict_probs(model, val_bags, device)
        labels = np.array([b.label for b in val_bags])
        val_auc = binary_metrics(labels == n_classes - 1, probs[:, -1])["auc"] if len(set(labels)) > 1 else float("nan")
        report = EpochReport(epoch + 1, float(np.mean(losses)), val_loss, val_auc, time.perf_counter() - t0,
                             float(np.mean(masked)) if masked else 0.0)
        history.append(report)
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, stale = val_loss, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if checkpoint is not None:
                save_checkpoint(checkpoint, model, {**meta, "epoch": epoch + 1, "val_loss": val_loss})
                if mhim is not None:  # the teacher of the same epoch, for the Compare view
                    save_checkpoint(teacher_path(checkpoint), mhim.teacher,
                                    {**meta, "role": "teacher", "epoch": epoch + 1, "val_loss": val_loss})
        else:
            stale += 1
        if on_epoch is not None:
            on_epoch(report)
        if stale >= cfg.patience:
            break
    if best_state is None:
        raise NapariMilError("the validation loss was never finite: check the features (scale, NaN) and the "
                             "learning rate; no checkpoint was written")
    model.load_state_dict(best_state)
    probs, _ = predict_probs(model, val_bags, device)
    labels = np.array([b.label for b in val_bags])
    threshold = choose_threshold(labels == n_classes - 1, probs[:, -1]) if len(set(labels)) > 1 else 0.5
    metrics = binary_metrics(labels == n_classes - 1, probs[:, -1], threshold)
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, {**meta, "epoch": best_epoch, "val_loss": best_loss, "threshold": threshold,
                                            "val_metrics": metrics})
    if device.type == "cuda":  # hand back CPU modules; _releases_gpu_memory frees the rest
        model.cpu()
        if mhim is not None:
            mhim.teacher.cpu()
    return TrainResult(model, history, best_epoch, threshold, metrics, Path(checkpoint) if checkpoint else None, mhim)


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))


# ---- checkpoints --------------------------------------------------------------------------
def teacher_path(checkpoint: str | Path) -> Path:
    """Where an MHIM-MIL run keeps its teacher: beside the student, with ``_teacher`` appended."""
    base = Path(checkpoint)
    if base.suffix in (".json", ".safetensors"):
        base = base.with_suffix("")
    return base.with_name(base.name + "_teacher")


def load_teacher(checkpoint: str | Path, meta: dict, device: str = "cpu") -> torch.nn.Module | None:
    """The teacher saved with an MHIM-MIL student (None for plain training)."""
    if not meta.get("teacher"):
        return None
    teacher, _ = load_checkpoint(teacher_path(checkpoint), feature_dim=meta["in_dim"], device=device)
    return teacher


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict) -> Path:
    """``path.safetensors`` (weights) and ``path.json`` (what to rebuild it with), both atomic."""
    from safetensors.torch import save_file

    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    weights, config = base.with_suffix(".safetensors"), base.with_suffix(".json")
    tmp_w, tmp_c = weights.with_name(weights.name + ".tmp"), config.with_name(config.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp_w))
    tmp_c.write_text(json.dumps(_jsonable({"format": "napari-mil-checkpoint-1", **meta}), indent=2))
    os.replace(tmp_w, weights)
    os.replace(tmp_c, config)
    return base


FOREIGN_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def load_checkpoint(path: str | Path, feature_dim: int | None = None, device: str = "cpu",
                    part: str = "student", **foreign_options) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from ``path.json`` and ``path.safetensors``; refuse features of another
    dimension and weights of another architecture with a clear message.

    A ``.pt``/``.pth``/``.ckpt``/``.bin`` file is a checkpoint of the official TransMIL, MHIM-MIL
    or CLAM code, read without unpickling code (``napari_mil.models.interop``); ``part`` picks an
    MHIM-MIL file's student or teacher, ``foreign_options`` its activations."""
    from safetensors.torch import load_file

    base = Path(path)
    if base.suffix in FOREIGN_SUFFIXES:
        from napari_mil.models.interop import ForeignCheckpointError, load_foreign_checkpoint

        try:
            model, meta = load_foreign_checkpoint(base, part, feature_dim, **foreign_options)
        except ForeignCheckpointError as exc:
            raise CheckpointError(str(exc)) from None
        return model.to(device), meta
    if base.suffix in (".json", ".safetensors"):
        base = base.with_suffix("")
    config, weights = base.with_suffix(".json"), base.with_suffix(".safetensors")
    if not config.exists() or not weights.exists():
        raise CheckpointError(f"checkpoint {base.name}: need both {config.name} and {weights.name}")
    try:
        meta = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config.name} is not valid JSON: {exc}") from None
    if meta.get("format") != "napari-mil-checkpoint-1":
        raise CheckpointError(f"{config.name} is not a napari-mil checkpoint")
    if feature_dim is not None and feature_dim != meta["in_dim"]:
        raise CheckpointError(
            f"the checkpoint expects {meta['in_dim']}-d features ({meta.get('encoder', 'its encoder')}) "
            f"but these have {feature_dim}: extract features with the encoder it was trained on"
        )
    model = create_model(meta["model"], meta["in_dim"], meta["n_classes"], **meta.get("model_cfg", {}))
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"cannot read {weights.name}: {exc}") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong or len(state) != len(own):
        raise CheckpointError(
            f"{weights.name} does not fit a {meta['model']} model: {len(missing)} missing, {len(wrong)} of another "
            f"shape, {len(set(state) - set(own))} unexpected tensors (another architecture?)"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), meta
