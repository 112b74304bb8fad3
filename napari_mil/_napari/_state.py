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


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def state_for(viewer) -> ViewerState:
    """The state of this viewer, created on first use and dropped with the viewer."""
    if viewer not in _STATES:
        _STATES[viewer] = ViewerState()
    return _STATES[viewer]
