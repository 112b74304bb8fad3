"""Training a MIL model on in-memory bags, plainly or in MHIM-MIL mode, with checkpoints.

One bag per step (bags differ in size), Adam with weight decay and a cosine learning-rate
schedule, class-weighted cross-entropy, features normalised with statistics of the training
bags (kept in the checkpoint and applied by the model wherever it predicts), early stopping on
validation loss after a minimum number of epochs, deterministic seeds, mixed precision on CUDA
(bfloat16 where the GPU has it, else float16 with loss scaling; see ``autocast_settings``). The
defaults were chosen by the experiment in docs/benchmarks.md ("Choosing the training
defaults") on the semi-real cohort.

MHIM-MIL runs as its authors run it: a plain baseline is trained first (or taken from
``teacher_init``), the EMA teacher starts from it, and the student's instance embedding starts
from the baseline's (the official ``--init_stu_type=fc``). ``teacher="fresh"`` starts the
teacher from the student's random initialisation instead.

Progress, live metrics and cooperative cancel go through callbacks, which is how the GUI
drives it. Checkpoints are a safetensors file of weights plus a JSON file of the
configuration; the best epoch's is written atomically whenever validation improves, so a
cancel keeps the last good one.
"""

from __future__ import annotations

import functools
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_mil.devices import resolve_device
from napari_mil.errors import NapariMilError
from napari_mil.models import create_model
from napari_mil.training.checkpoints import CheckpointError, jsonable, load_checkpoint, save_checkpoint, teacher_path
from napari_mil.training.metrics import binary_metrics, choose_threshold
from napari_mil.training.mhim import MHIMConfig, MHIMTrainer
from napari_mil.training.normalise import FeatureNormaliser, normaliser_of


class TrainingCancelled(NapariMilError):
    """Training stopped on request; the best checkpoint so far is kept."""


@dataclass
class TrainConfig:
    model: str = "abmil"
    model_cfg: dict = field(default_factory=dict)
    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # learning rate: "cosine" (to 0 over the epochs) or "constant"
    patience: int = 10  # epochs without validation improvement before stopping...
    min_epochs: int = 15  # ...but never before this many (small validation sets are noisy early on)
    normalisation: str = "global"  # "none", "global" or "slide" (napari_mil.training.normalise)
    # stain augmentation in feature space: each training bag is shifted by one random offset per
    # feature, this many standard deviations of the training instances (a slide's stain moves all
    # its patches alike); 0 turns it off
    bag_shift: float = 0.0
    class_weighting: bool = True
    seed: int = 0
    mhim: MHIMConfig | None = None
    # MHIM-MIL: where the teacher starts. "baseline": a plain model trained first with this
    # configuration (the official recipe); "fresh": a copy of the student's initialisation.
    # teacher_init (a napari-mil checkpoint or an official .pt) gives the baseline instead of training it.
    teacher: str = "baseline"
    teacher_init: str | None = None
    # MHIM-MIL: the student's start from the baseline: "fc" (its instance embedding, the official
    # --init_stu_type=fc), "all" or "none"
    init_student: str = "fc"
    device: str = "auto"
    amp: bool = True  # mixed precision, on CUDA only (autocast_settings)


@dataclass
class EpochReport:
    epoch: int
    train_loss: float
    val_loss: float
    val_auc: float
    seconds: float
    mask_ratio: float  # share of instances the student did not see (0 without MHIM)
    phase: str = "train"  # "baseline" while an MHIM-MIL run trains its teacher's baseline, else "train"


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list[EpochReport]
    best_epoch: int
    threshold: float  # chosen on validation (Youden's J)
    val_metrics: dict
    checkpoint: Path | None
    mhim: MHIMTrainer | None
    warnings: list[str] = field(default_factory=list)  # e.g. that the model did not learn
    baseline: TrainResult | None = None  # MHIM-MIL: the plain run its teacher started from


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


def autocast_settings(device: torch.device, amp: bool = True) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for none, whether the loss needs a GradScaler) for training on
    ``device``: bfloat16 on a CUDA GPU that computes in it natively (float32's range: no loss
    scaling), float16 with a GradScaler on older GPUs (its small range underflows gradients
    otherwise), and no autocast on the CPU or MPS."""
    if not amp or device.type != "cuda":
        return None, False
    with torch.cuda.device(device):  # the GPU trained on, not the current one
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, False
    return torch.float16, True


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

    In MHIM-MIL mode with ``cfg.teacher == "baseline"`` and no ``teacher_init``, a plain model
    is trained first with the same configuration (its checkpoint ``<checkpoint>_baseline``, its
    epochs reported with ``phase="baseline"``), and the teacher and the student's embedding start
    from it. ``on_start(model, mhim)`` receives each phase's model (and the MHIMTrainer, or None)
    before its first epoch; ``on_epoch(report)`` runs after each epoch, between optimiser steps,
    so it may read the models safely (the GUI draws its live maps there); ``cancel()`` is polled
    before each bag."""
    if not train_bags or not val_bags:
        raise NapariMilError("training needs at least one training and one validation slide")
    if cfg.teacher not in ("baseline", "fresh"):
        raise NapariMilError(f"teacher must be 'baseline' or 'fresh', not {cfg.teacher!r}")
    if cfg.init_student not in ("none", "fc", "all"):
        raise NapariMilError(f"init_student must be 'none', 'fc' or 'all', not {cfg.init_student!r}")
    if cfg.teacher_init and cfg.mhim is None:
        raise NapariMilError("a teacher initialisation needs MHIM-MIL mode (choose a preset)")
    in_dim = train_bags[0].features.shape[1]
    n_classes = int(max(b.label for b in train_bags + val_bags)) + 1
    warnings_ = []
    if cfg.mhim is not None:
        warnings_ += mhim_bag_size_warnings(cfg.mhim, train_bags)
    baseline_result, baseline_meta, teacher_state = None, None, None
    model_cfg, normaliser = cfg.model_cfg, FeatureNormaliser.fit(cfg.normalisation, train_bags)
    if cfg.mhim is not None and (cfg.teacher_init or cfg.teacher == "baseline"):
        if cfg.teacher_init:
            baseline, baseline_meta = load_checkpoint(cfg.teacher_init, feature_dim=in_dim)
            if baseline_meta["model"] != cfg.model or baseline_meta["n_classes"] != n_classes:
                raise CheckpointError(
                    f"the teacher's baseline is a {baseline_meta['model']} with {baseline_meta['n_classes']} classes; "
                    f"train a {baseline_meta['model']} on {baseline_meta['n_classes']} classes with it")
            # the student must see the features as its teacher does: the baseline's normalisation
            normaliser = normaliser_of(baseline)
        else:
            base_ckpt = Path(f"{checkpoint}_baseline") if checkpoint is not None else None
            baseline_result = _train_phase(train_bags, val_bags, replace(cfg, mhim=None), normaliser, cfg.model_cfg,
                                           None, None, base_ckpt, on_epoch, cancel, extra_meta, on_start, "baseline")
            baseline, baseline_meta = baseline_result.model, {"model_cfg": cfg.model_cfg}
        model_cfg, teacher_state = baseline_meta.get("model_cfg", {}), baseline.state_dict()
    result = _train_phase(train_bags, val_bags, cfg, normaliser, model_cfg, teacher_state, cfg.init_student,
                          checkpoint, on_epoch, cancel, extra_meta, on_start, "train")
    result.baseline = baseline_result
    result.warnings = warnings_ + result.warnings
    return result


def mhim_bag_size_warnings(mhim: MHIMConfig, bags) -> list[str]:
    """What a preset's high-attention mask does to bags this small: it masks nothing in a bag of
    fewer than 1 / (mask_ratio_h x mask_ratio_hr) instances (the official counts are floors).
    The CLI and the Retrain dock show these before training starts."""
    if mhim.mask_ratio_h <= 0 or mhim.mask_ratio_hr <= 0 or not bags:
        return []
    need = math.ceil(1.0 / (mhim.mask_ratio_h * mhim.mask_ratio_hr) - 1e-9)
    small = sum(len(b.features) < need for b in bags)
    advice = (f"the preset's high-attention mask (mask_ratio_h {mhim.mask_ratio_h} x mask_ratio_hr "
              f"{mhim.mask_ratio_hr}) masks no instance in a bag of fewer than {need}")
    if small == len(bags):
        return [f"every training bag is too small for MHIM-MIL's hard-instance mining: {advice}, and the largest "
                f"has {max(len(b.features) for b in bags)}; only the low and random masks act. Raise mask_ratio_h "
                "(--mask-ratio-h) or tile smaller patches to mine hard instances"]
    if small:
        return [f"{small} of {len(bags)} training bags are too small: {advice}"]
    return []


def _train_phase(train_bags, val_bags, cfg: TrainConfig, normaliser, model_cfg: dict, teacher_state, init_student,
                 checkpoint, on_epoch, cancel, extra_meta, on_start, phase: str) -> TrainResult:
    """One training run: a plain model, or an MHIM-MIL student whose teacher (and, by
    ``init_student``, part of the student) starts from ``teacher_state``."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    in_dim = train_bags[0].features.shape[1]
    n_classes = int(max(b.label for b in train_bags + val_bags)) + 1
    model = create_model(cfg.model, in_dim, n_classes, **model_cfg)
    if teacher_state is not None and init_student in ("fc", "all"):
        own = model.state_dict()
        prefix = embedding_prefix(model)
        take = {k: v for k, v in teacher_state.items() if k in own and (init_student == "all" or
                                                                        (prefix and k.startswith(prefix)))}
        model.load_state_dict({**own, **take})
    if normaliser is not None:
        normaliser.attach(model)
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule not in ("cosine", "constant"):
        raise NapariMilError(f"schedule must be 'cosine' or 'constant', not {cfg.schedule!r}")
    steps = max(cfg.epochs * len(train_bags), 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cfg.schedule == "cosine" else None
    counts = np.bincount([b.label for b in train_bags], minlength=n_classes).astype(np.float64)
    weight = torch.tensor(counts.sum() / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device) \
        if cfg.class_weighting else None
    shift_scale = None
    if cfg.bag_shift > 0:
        stacked = np.concatenate([b.features for b in train_bags])
        shift_scale = torch.as_tensor(cfg.bag_shift * stacked.std(0), dtype=torch.float32, device=device)  # (D,)
        shift_gen = torch.Generator().manual_seed(cfg.seed + 1)
    mhim = MHIMTrainer(model, cfg.mhim, steps, teacher_state, seed=cfg.seed) if cfg.mhim else None
    amp_dtype, needs_scaler = autocast_settings(device, cfg.amp)
    scaler = torch.amp.GradScaler(device.type) if needs_scaler else None
    if on_start is not None:
        on_start(model, mhim)
    history, best_loss, best_epoch, best_state, stale = [], float("inf"), -1, None, 0
    meta = {"train_config": jsonable(asdict(cfg)), "model": cfg.model, "model_cfg": model_cfg,
            "in_dim": in_dim, "n_classes": n_classes, **(extra_meta or {})}
    if normaliser is not None:
        meta["normalisation"] = normaliser.to_meta()
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
            if shift_scale is not None:
                x = x + torch.randn(x.shape[-1], generator=shift_gen).to(device) * shift_scale
            y = torch.tensor([bag.label], device=device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if mhim is not None:
                    loss, _, _ = mhim.loss(x, y, weight)
                    masked.append(mhim.history[-1].mask_ratio)
                else:
                    loss = F.cross_entropy(model(x).logits.float(), y, weight=weight)
            opt.zero_grad(set_to_none=True)
            stepped = True
            if scaler is not None:  # float16: scaled gradients; a step with inf/NaN ones is skipped
                scaler.scale(loss).backward()
                scale = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                stepped = scaler.get_scale() >= scale  # the scale drops when the step was skipped
            else:
                loss.backward()
                opt.step()
            if sched is not None and stepped:
                sched.step()
            if mhim is not None:
                mhim.after_optimizer_step()
            losses.append(loss.item())
        probs, val_loss = predict_probs(model, val_bags, device)
        labels = np.array([b.label for b in val_bags])
        val_auc = binary_metrics(labels == n_classes - 1, probs[:, -1])["auc"] if len(set(labels)) > 1 else float("nan")
        report = EpochReport(epoch + 1, float(np.mean(losses)), val_loss, val_auc, time.perf_counter() - t0,
                             float(np.mean(masked)) if masked else 0.0, phase)
        history.append(report)
        # model selection: the lowest validation loss from min_epochs on; before that each epoch
        # stands in, so that a cancel keeps the latest (a small validation set often favours an
        # epoch-1 model that has not learned yet)
        first_eligible = min(cfg.min_epochs, cfg.epochs)
        if math.isfinite(val_loss) and (epoch + 1 <= first_eligible or val_loss < best_loss - 1e-6):
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
        if stale >= cfg.patience and epoch + 1 >= cfg.min_epochs:
            break
    if best_state is None:
        raise NapariMilError("the validation loss was never finite: check the features (scale, NaN) and the "
                             "learning rate; no checkpoint was written")
    model.load_state_dict(best_state)
    probs, _ = predict_probs(model, val_bags, device)
    labels = np.array([b.label for b in val_bags])
    threshold = choose_threshold(labels == n_classes - 1, probs[:, -1]) if len(set(labels)) > 1 else 0.5
    metrics = binary_metrics(labels == n_classes - 1, probs[:, -1], threshold)
    warnings_ = learning_warnings(history, probs, n_classes, phase)
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, {**meta, "epoch": best_epoch, "val_loss": best_loss, "threshold": threshold,
                                            "val_metrics": metrics, "warnings": warnings_})
    if device.type == "cuda":  # hand back CPU modules; _releases_gpu_memory frees the rest
        model.cpu()
        if mhim is not None:
            mhim.teacher.cpu()
    return TrainResult(model, history, best_epoch, threshold, metrics, Path(checkpoint) if checkpoint else None, mhim,
                       warnings_)


def learning_warnings(history: list[EpochReport], val_probs: np.ndarray, n_classes: int, phase: str = "train") -> list[str]:
    """Signs that a run did not learn: a training loss that stayed near chance (ln C for the
    class-weighted loss), or validation probabilities that collapsed onto one value."""
    out = []
    what = "the baseline" if phase == "baseline" else "the model"
    chance = math.log(n_classes)
    lowest = min(r.train_loss for r in history)
    if lowest > 0.9 * chance:
        out.append(f"{what} did not learn: the training loss stayed at {lowest:.3f}, near chance ({chance:.3f}); "
                   "try a higher learning rate, more epochs, or features of another encoder")
    spread = float(np.ptp(val_probs[:, -1])) if len(val_probs) > 1 else 1.0
    if spread < 0.05:
        out.append(f"{what}'s validation probabilities collapsed (all within {spread:.3f} of each other): "
                   "it does not tell the slides apart, and its attention map means little")
    return out


def embedding_prefix(model: torch.nn.Module) -> str | None:
    """The state-dict prefix of a model's instance embedding (the official ``patch_to_emb``),
    which MHIM-MIL's init_student="fc" copies from the baseline; None when the model has none."""
    for name in ("embed", "_fc1", "fc1"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name + "."
    return None
