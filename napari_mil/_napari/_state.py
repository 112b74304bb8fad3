"""One evented state per viewer, shared by the docks: the output of one is the input of the next."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from psygnal import evented


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


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def state_for(viewer) -> ViewerState:
    """The state of this viewer, created on first use and dropped with the viewer."""
    if viewer not in _STATES:
        _STATES[viewer] = ViewerState()
    return _STATES[viewer]


_DOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_dock(viewer, dock) -> None:
    """Remember a viewer's dock by its class, so one dock can reach another (Retrain -> Compare)."""
    _DOCKS.setdefault(viewer, {})[type(dock)] = weakref.ref(dock)


def find_dock(viewer, cls):
    """The viewer's open dock of this class, or None (never one the user has closed)."""
    ref = _DOCKS.get(viewer, {}).get(cls)
    dock = ref() if ref is not None else None
    return None if dock is None or getattr(dock, "closed", False) else dock
