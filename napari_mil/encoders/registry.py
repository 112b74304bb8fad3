"""The encoder registry: ``create_encoder(name, weights, device)`` and friends.

A builder is a function ``builder(weights, device) -> Encoder``. Builders import their heavy
dependencies (torch models, timm, transformers) when called, so listing encoders is cheap.
Other packages add encoders through the ``napari_mil.encoders`` entry-point group, whose
entries name a builder; ``register_encoder`` does the same at run time.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from napari_mil.devices import resolve_device
from napari_mil.errors import EncoderError

ENTRY_POINT_GROUP = "napari_mil.encoders"


@dataclass(eq=False)
class Encoder:
    """A patch encoder ready for inference.

    ``transform`` maps a uint8 batch (B, H, W, 3) tensor, already on ``device``, to the model's
    input; ``model`` maps that to (B, dim) features. Both run under ``precision`` autocast on
    CUDA. ``input_size`` is the patch side the model wants (the transform resizes to it).
    """

    name: str
    model: Any  # torch.nn.Module in eval mode, on device
    transform: Callable
    precision: Any  # torch.dtype
    dim: int
    input_size: int
    weights_hash: str
    device: Any  # torch.device
    description: str = ""

    def __call__(self, batch):
        """Features (B, dim) float32 for a uint8 (B, H, W, 3) batch on the encoder's device."""
        import torch

        use_amp = self.device.type == "cuda" and self.precision in (torch.float16, torch.bfloat16)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.precision, enabled=use_amp):
            x = self.transform(batch)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.model(x)
        return out.float()


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    builder: Callable[..., Encoder]
    dim: int | None
    description: str
    needs: str = ""  # what must be installed or authorised


_REGISTRY: dict[str, EncoderSpec] = {}
_ENTRY_POINTS_LOADED = False


def register_encoder(name: str, dim: int | None = None, description: str = "", needs: str = ""):
    """Decorator registering ``builder(weights, device) -> Encoder`` under ``name``."""

    def decorate(builder):
        _REGISTRY[name] = EncoderSpec(name, builder, dim, description or (builder.__doc__ or "").strip().split("\n")[0], needs)
        return builder

    return decorate


def _load_builtins_and_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    from napari_mil.encoders import foundation, hne, resnet  # noqa: F401  (registration side effects)

    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            builder = ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            import warnings

            warnings.warn(f"encoder entry point {ep.name!r} failed to load: {exc}", stacklevel=2)
            continue
        _REGISTRY[ep.name] = EncoderSpec(ep.name, builder, None, f"from {ep.value}")


def list_encoders() -> list[EncoderSpec]:
    """Every registered encoder (built-in, entry point or registered at run time)."""
    _load_builtins_and_entry_points()
    return sorted(_REGISTRY.values(), key=lambda s: s.name)


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a weights file (first 16 hex digits), the weights' identity in caches and attrs."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


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
    if name not in _REGISTRY:
        known = ", ".join(s.name for s in list_encoders())
        raise EncoderError(f"unknown encoder {name!r}; known encoders: {known} (or torchscript:PATH, module:pkg.mod:fn)")
    if weights is not None and not Path(weights).exists():
        raise EncoderError(f"weights file {weights} does not exist")
    encoder = _REGISTRY[name].builder(weights, dev)
    if dev.type == "cuda":  # convolutions run fastest on channels-last inputs and weights
        import torch

        encoder.model = encoder.model.to(memory_format=torch.channels_last)
    return encoder
