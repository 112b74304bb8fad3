"""One evented state per viewer, shared by the docks: the output of one is the input of the next.

Docks write the state and listen to it; none calls another. Every field emits
``state.events.<field>`` when it is given a new value; the state is written on the GUI thread
only, so listeners run there. What listens:

- ``pair``: the Compare dock shows each new teacher | student pair (the Retrain dock writes one
  after every epoch, the Compare dock one for each comparison it computes).
- ``model``: a new model, written last by ``set_model`` so that ``model_meta``, ``teacher`` and
  ``mhim`` already belong to it (and ``pair``, of the previous model, is None); the Compare dock
  computes the pair of a new teacher and student.
- ``features``: a new bag for the open slide; the Compare dock recomputes the pair it shows.
- ``training``: a training setup (cohort, checkpoint folder, configuration) that the Retrain
  dock's form takes on; the teaching demo writes it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psygnal import evented


@dataclass(frozen=True, eq=False)
class MapPair:
    """A teacher's and a student's attention maps of the open slide (heatmaps.AttentionMap).
    ``announce``: whether showing it deserves a notification (not for the refresh after every
    epoch). Compared by identity: every new pair is news."""

    teacher: Any
    student: Any
    announce: bool = True


@dataclass(frozen=True, eq=False)
class TrainingSetup:
    """What the Retrain dock trains: a cohort CSV, where the checkpoints and results go, a
    TrainConfig (its fields the dock does not show are kept as given) and the number of folds
    for a CSV without a split column (None: the dock's)."""

    cohort: Path
    checkpoint_dir: Path
    config: Any  # napari_mil.training.trainer.TrainConfig
    folds: int | None = None


@evented
@dataclass
class ViewerState:
    slide: Any = None  # napari_mil.slide.Slide
    slide_layer: str = ""
    tissue_mask: Any = None  # napari_mil.tissue.TissueMask
    grid: Any = None  # napari_mil.tiling.PatchGrid
    features: Any = None  # napari_mil.features.store.FeatureBag of the open slide
    encoder: str = ""  # the encoder those features come from
    model: Any = None  # a MIL model (torch.nn.Module), from a checkpoint or the Retrain dock
    model_meta: Any = None  # its checkpoint metadata (model, model_cfg, in_dim, threshold, ...)
    teacher: Any = None  # MHIM-MIL's teacher for the Compare dock, when there is one
    mhim: Any = None  # the MHIMConfig the teacher masks with
    attention: Any = None  # napari_mil.heatmaps.AttentionMap of the last inference
    pair: MapPair | None = None  # the newest teacher | student maps of the open slide
    training: TrainingSetup | None = None  # a setup for the Retrain dock's form

    def set_model(self, model, meta: dict, teacher=None, mhim=None) -> None:
        """A new model with its metadata, teacher and MHIM-MIL configuration. The pair of maps of
        the previous model goes; ``model`` is set last: its event comes once the rest belongs to it."""
        self.pair = None
        self.model_meta, self.teacher, self.mhim = meta, teacher, mhim
        self.model = model


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def state_for(viewer) -> ViewerState:
    """The state of this viewer, created on first use and dropped with the viewer."""
    if viewer not in _STATES:
        _STATES[viewer] = ViewerState()
    return _STATES[viewer]
