"""Patch encoders: ``create_encoder(name, weights=None, device="auto")``, ``list_encoders()``,
``register_encoder``. Importing this package imports no torch; builders do."""

from napari_mil.encoders.base import Encoder, EncoderSpec, register_encoder
from napari_mil.encoders.registry import create_encoder, list_encoders

DEFAULT_ENCODER = "hne_stats"

__all__ = ["DEFAULT_ENCODER", "Encoder", "EncoderSpec", "create_encoder", "list_encoders", "register_encoder"]
