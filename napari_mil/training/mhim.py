"""MHIM-MIL (Tang et al., ICCV 2023): masked hard instance mining as a training mode for any model.

An EMA teacher scores every instance of a bag. The instances it finds easiest (highest
attention) are masked, so the student learns from the rest, the hard instances:

- random-high: of the top ``mask_ratio_h`` fraction by teacher attention, a random
  ``mask_ratio_hr`` fraction is masked (``mask_ratio_h`` optionally decays on a cosine to 0);
- low: the bottom ``mask_ratio_l`` fraction is masked;
- random: a ``mask_ratio`` fraction of the instances still unmasked is masked at random.

The loss is cross-entropy plus ``alpha`` times a consistency term, the soft-target cross-entropy
between the teacher's bag embedding (softmax at ``temp_t``) and the student's (log-softmax at
``temp_s``). The teacher follows the student by an exponential moving average with momentum
``mm``, optionally on a cosine schedule to ``mm_final``. Counts are floors: k = int(ratio * n).
Defaults and presets follow the official release (DearCaat/MHIM-MIL).
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from napari_mil.errors import NapariMilError
from napari_mil.models.contract import attention_options


@dataclass(frozen=True)
class MHIMConfig:
    mask_ratio: float = 0.0  # random masking of the remaining instances
    mask_ratio_l: float = 0.0  # low-attention masking
    mask_ratio_h: float = 0.0  # share of top-attention instances eligible for masking
    mask_ratio_hr: float = 1.0  # share of those that is masked (random-high)
    mrh_schedule: bool = False  # cosine decay of mask_ratio_h to 0 over training
    mm: float = 0.9999  # EMA momentum of the teacher
    mm_final: float = 1.0
    mm_schedule: bool = False  # cosine schedule of the momentum from mm to mm_final
    alpha: float = 0.0  # weight of the consistency loss (cl_alpha)
    temp_t: float = 0.1
    temp_s: float = 1.0
    attn_layer: int = 0  # for TransMIL teachers: the layer whose class-token attention scores
    # how the teacher ranks instances: "attention", or MHIM-v2's "class_aware" score
    score: str = "attention"


# The official recipes (README of DearCaat/MHIM-MIL), by dataset and model.
PRESETS: dict[str, MHIMConfig] = {
    "camelyon16_abmil": MHIMConfig(mask_ratio=0.5, mask_ratio_l=0.0, mask_ratio_h=0.01, mask_ratio_hr=0.5,
                                   mrh_schedule=True, alpha=0.1),
    "tcga_abmil": MHIMConfig(mask_ratio=0.7, mask_ratio_l=0.2, mask_ratio_h=0.02, mrh_schedule=True,
                             mm_schedule=True, alpha=0.5),
    "camelyon16_transmil": MHIMConfig(mask_ratio=0.0, mask_ratio_l=0.8, mask_ratio_h=0.03, mask_ratio_hr=0.5,
                                      mrh_schedule=True, mm_schedule=True, alpha=0.1, attn_layer=0),
    "tcga_transmil": MHIMConfig(mask_ratio=0.6, mask_ratio_l=0.2, mask_ratio_h=0.02, mrh_schedule=True,
                                alpha=0.5, attn_layer=0),
}


def cosine_schedule(start: float, end: float, steps: int) -> np.ndarray:
    """``steps`` values from ``start`` to ``end`` along half a cosine (the official scheduler)."""
    i = np.arange(steps)
    return end + 0.5 * (start - end) * (1 + np.cos(np.pi * i / max(steps, 1)))


@dataclass
class InstanceMasks:
    """Boolean masks over a bag's N instances (True = masked by that rule) and what is kept."""

    high: torch.Tensor  # (N,)
    low: torch.Tensor  # (N,)
    random: torch.Tensor  # (N,)

    @property
    def masked(self) -> torch.Tensor:
        return self.high | self.low | self.random

    @property
    def kept(self) -> torch.Tensor:
        return ~self.masked

    def cpu(self) -> InstanceMasks:
        return InstanceMasks(*(m.detach().cpu() for m in (self.high, self.low, self.random)))


@dataclass(frozen=True, slots=True)
class StepMasking:
    """What one MHIM-MIL step masked: the bag's size and the instances each rule masked."""

    step: int
    instances: int
    high: int
    low: int
    random: int

    @property
    def masked(self) -> int:
        return self.high + self.low + self.random  # the rules' masks are disjoint

    @property
    def mask_ratio(self) -> float:
        return self.masked / max(self.instances, 1)


def select_masks(attention: torch.Tensor, cfg: MHIMConfig, mask_ratio_h: float | None = None,
                 generator: torch.Generator | None = None) -> InstanceMasks:
    """Masks from one bag's teacher attention (N,). ``mask_ratio_h`` overrides the config's (for
    schedules). At least one instance is always kept."""
    n = attention.shape[0]
    device = attention.device
    ratio_h = cfg.mask_ratio_h if mask_ratio_h is None else mask_ratio_h
    order = torch.argsort(attention, descending=True)  # (N,) highest first
    high = torch.zeros(n, dtype=torch.bool, device=device)
    low = torch.zeros(n, dtype=torch.bool, device=device)
    rand = torch.zeros(n, dtype=torch.bool, device=device)
    n_top = int(ratio_h * n)
    n_high = int(cfg.mask_ratio_hr * n_top)
    if n_high:
        pick = torch.randperm(n_top, generator=generator)[:n_high].to(device)
        high[order[:n_top][pick]] = True
    n_low = int(cfg.mask_ratio_l * n)
    if n_low:
        low[order[n - n_low :]] = True
    low &= ~high
    remaining = torch.nonzero(~(high | low)).flatten()
    n_rand = min(int(cfg.mask_ratio * len(remaining)), max(len(remaining) - 1, 0))
    if n_rand:
        rand[remaining[torch.randperm(len(remaining), generator=generator)[:n_rand].to(device)]] = True
    if not (~(high | low | rand)).any():  # never mask everything: keep the lowest-attention instance
        low[order[-1]] = False
    return InstanceMasks(high, low, rand)


def class_aware_score(model: torch.nn.Module, out) -> torch.Tensor:
    """MHIM-v2's class-aware instance score (B, N): each instance's share of the bag embedding,
    a_k h_k, put through the bag classifier's weights; the score is the highest class probability
    of that contribution, so instances that push the bag confidently towards a class rank first.
    Needs an attention-pooling model (``MILOutput.instances``) with a linear ``classifier``."""
    if out.instances is None or not isinstance(getattr(model, "classifier", None), torch.nn.Linear):
        raise NapariMilError(f"the class-aware score needs an attention-pooling model (ABMIL, Extreme ABMIL, mean "
                             f"pooling); {type(model).__name__} is not one")
    contribution = out.attention[..., None] * out.instances  # (B, N, E)
    logits = contribution @ model.classifier.weight.T  # (B, N, C)
    return torch.softmax(logits.float(), dim=-1).amax(-1)


def consistency_loss(student: torch.Tensor, teacher: torch.Tensor, temp_t: float, temp_s: float) -> torch.Tensor:
    """Soft-target cross-entropy of student bag embeddings (B, E) against the teacher's."""
    target = F.softmax(teacher.detach() / temp_t, dim=-1)
    return torch.sum(-target * F.log_softmax(student / temp_s, dim=-1), dim=-1).mean()


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


def make_teacher(student: torch.nn.Module, init_state: dict | None = None) -> torch.nn.Module:
    """A frozen copy of the student (or of a baseline checkpoint's weights) in eval mode."""
    teacher = copy.deepcopy(student)
    if init_state is not None:
        teacher.load_state_dict(init_state)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class MHIMTrainer:
    """One MHIM-MIL training step per bag, with the schedules advanced per step.

    ``history`` holds what each of the last ``history_steps`` steps masked, as counts
    (``StepMasking``), and ``last_masks`` the masks of the latest step, on the CPU: what a viewer
    or a report needs, in memory that does not grow with the steps.
    """

    def __init__(self, student, cfg: MHIMConfig, total_steps: int, teacher_init: dict | None = None, seed: int = 0,
                 history_steps: int = 10_000):
        if cfg.score not in ("attention", "class_aware"):
            raise NapariMilError(f"score must be 'attention' or 'class_aware', not {cfg.score!r}")
        self.student = student
        self.teacher = make_teacher(student, teacher_init)
        # the teacher scores with the configured layer (TransMIL); other models take no options
        self.teacher_options = attention_options(self.teacher, cfg.attn_layer, None)
        self.cfg = cfg
        self.step = 0
        self.ratio_h = cosine_schedule(cfg.mask_ratio_h, 0.0, total_steps) if cfg.mrh_schedule else None
        self.momentum = cosine_schedule(cfg.mm, cfg.mm_final, total_steps) if cfg.mm_schedule else None
        self.generator = torch.Generator().manual_seed(seed)
        self.history: deque[StepMasking] = deque(maxlen=history_steps)
        self.last_masks: InstanceMasks | None = None

    def current_ratio_h(self) -> float:
        if self.ratio_h is None:
            return self.cfg.mask_ratio_h
        return float(self.ratio_h[min(self.step, len(self.ratio_h) - 1)])

    def current_momentum(self) -> float:
        if self.momentum is None:
            return self.cfg.mm
        return float(self.momentum[min(self.step, len(self.momentum) - 1)])

    def loss(self, x: torch.Tensor, label: torch.Tensor, class_weight: torch.Tensor | None = None):
        """Loss for one bag x (1, N, D); returns (loss, student output, masks)."""
        with torch.no_grad():
            teacher_out = self.teacher(x, **self.teacher_options)
            scores = teacher_out.attention if self.cfg.score == "attention" else class_aware_score(self.teacher, teacher_out)
        masks = select_masks(scores[0], self.cfg, self.current_ratio_h(), self.generator)
        self._record(masks)
        out = self.student(x[:, masks.kept])
        loss = F.cross_entropy(out.logits, label, weight=class_weight)
        if self.cfg.alpha:
            loss = loss + self.cfg.alpha * consistency_loss(out.embedding, teacher_out.embedding, self.cfg.temp_t, self.cfg.temp_s)
        return loss, out, masks

    def _record(self, masks: InstanceMasks) -> None:
        self.last_masks = masks.cpu()
        counts = (int(m.sum()) for m in (self.last_masks.high, self.last_masks.low, self.last_masks.random))
        self.history.append(StepMasking(self.step, len(self.last_masks.high), *counts))

    def after_optimizer_step(self) -> None:
        ema_update(self.teacher, self.student, self.current_momentum())
        self.step += 1


def preset(name: str, **overrides) -> MHIMConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown MHIM preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)

