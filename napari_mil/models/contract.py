"""What every MIL model answers, and the small pieces the models share.

A model maps a bag ``x`` (B, N, D) with an optional padding mask (B, N; True = a real
instance) to a ``MILOutput``. Models whose attention can be read from more than one place
(TransMIL: a layer and a head of its class-token attention) say so with
``CHOOSES_ATTENTION = True`` and take ``attention_layer`` and ``attention_head`` as arguments
of that call: what is shown is chosen per call, never by setting attributes on a model that
another thread may be running.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class MILOutput:
    logits: torch.Tensor  # (B, C)
    embedding: torch.Tensor  # (B, E)
    attention: torch.Tensor  # (B, N), sums to 1 over the unmasked instances
    # (B, N, E) instance embeddings h_k when the bag embedding is sum_k a_k h_k (attention pooling);
    # MHIM-v2's class-aware instance score needs them
    instances: torch.Tensor | None = None


def attention_options(model: nn.Module, layer: int | None = None, head: int | None = None) -> dict:
    """Keyword arguments for ``model(x, **options)`` that choose where its attention is read:
    the layer and head for models that choose (TransMIL), nothing for the others; None keeps
    the model's own default."""
    if not getattr(model, "CHOOSES_ATTENTION", False):
        return {}
    return {"attention_layer": layer, "attention_head": head}


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over instances (dim 1); padded instances (mask False) get exactly 0."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=1)


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def bag_tensor(features: np.ndarray, device="cpu") -> torch.Tensor:
    """(1, N, D) float32 tensor of a bag's features on ``device``. Stored float16 features are
    widened by torch, which is faster than numpy for large bags (docs/benchmarks.md)."""
    array = np.ascontiguousarray(features)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(device=device, dtype=torch.float32)[None]
