"""Small helpers for HDF5 attributes shared by the grid and feature files."""

from __future__ import annotations

import numpy as np


def plain_attr(value):
    """An h5py attribute as a plain Python value: bytes decoded, numpy scalars unwrapped."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.shape == ():
        return value.item()
    return value
