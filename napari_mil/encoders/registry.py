"""The encoder registry: ``create_encoder(name, weights, device)`` and friends.

A builder is a function ``builder(weights, device) -> Encoder``. Builders import their heavy
dependencies (torch models, timm, transformers) when called, so listing encoders is cheap.
Other packages add encoders through the ``napari_mil.encoders`` entry-point group, whose
entries name a builder; ``register_encoder`` does the same at run time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from napari_mil.devices import resolve_device
from napari_mil.encoders import base
from napari_mil.encoders.base import Encoder, EncoderSpec
from napari_mil.errors import EncoderError

ENTRY_POINT_GROUP = "napari_mil.encoders"

_ENTRY_POINTS_LOADED = False


def _load_builtins_and_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    from napari_mil.encoders import foundation, hne, resnet  # noqa: F401  (registration side effects)

    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in base._REGISTRY:
            continue
        try:
            builder = ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            import warnings

            warnings.warn(f"encoder entry point {ep.name!r} failed to load: {exc}", stacklevel=2)
            continue
        base._REGISTRY[ep.name] = EncoderSpec(ep.name, builder, None, f"from {ep.value}")


def list_encoders() -> list[EncoderSpec]:
    """Every registered encoder (built-in, entry point or registered at run time)."""
    _load_builtins_and_entry_points()
    return sorted(base._REGISTRY.values(), key=lambda s: s.name)


def create_encoder(name: str, weights: str | os.PathLike | None = None, device: str | Any = "auto") -> Encoder:
    """Build an encoder by name.

    ``name`` is a registered name (see ``list_encoders``), ``torchscript:PATH`` for a
    TorchScript file, or ``module:package.module:function`` for a Python builder.
    ``weights`` is a local weights file where the encoder takes one.
    """
    dev = resolve_device(device, cpu_warning="no CUDA device: feature extraction runs on the CPU and will be slow "
                                                 "for large encoders")
    if name.startswith("torchscript:"):
        from napari_mil.encoders.custom import torchscript_encoder

        return torchscript_encoder(Path(name.split(":", 1)[1]), dev)
    if name.startswith("module:"):
        from napari_mil.encoders.custom import python_encoder

        return python_encoder(name.split(":", 1)[1], weights, dev)
    _load_builtins_and_entry_points()
    if name not in base._REGISTRY:
        known = ", ".join(s.name for s in list_encoders())
        raise EncoderError(f"unknown encoder {name!r}; known encoders: {known} (or torchscript:PATH, module:pkg.mod:fn)")
    if weights is not None and not Path(weights).exists():
        raise EncoderError(f"weights file {weights} does not exist")
    encoder = base._REGISTRY[name].builder(weights, dev)
    if dev.type == "cuda":  # convolutions run fastest on channels-last inputs and weights
        import torch

        encoder.model = encoder.model.to(memory_format=torch.channels_last)
    return encoder
