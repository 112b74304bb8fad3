"""What an encoder is, and the table of registered ones (filled by ``register_encoder``; read
through ``napari_mil.encoders.registry``). The built-in encoders import this module, never
the registry, which imports them."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable


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
def register_encoder(name: str, dim: int | None = None, description: str = "", needs: str = ""):
    """Decorator registering ``builder(weights, device) -> Encoder`` under ``name``."""

    def decorate(builder):
        _REGISTRY[name] = EncoderSpec(name, builder, dim, description or (builder.__doc__ or "").strip().split("\n")[0], needs)
        return builder

    return decorate


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a weights file (first 16 hex digits), the weights' identity in caches and attrs."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]
