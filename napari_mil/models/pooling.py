"""Baselines: mean pooling and max pooling of embedded instances."""

from __future__ import annotations

import torch
from torch import nn

from napari_mil.models.contract import MILOutput, masked_softmax


class _EmbeddedInstances(nn.Module):
    """Instances embedded by ReLU(W h_k) and a linear classifier, pooled by the subclass."""

    def __init__(self, in_dim: int, n_classes: int = 2, embed_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(embed_dim, n_classes)


class MeanPoolMIL(_EmbeddedInstances):
    """z = mean of ReLU(W h_k); attention is uniform over the real instances."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)  # (B, N, E)
        attention = masked_softmax(torch.zeros(h.shape[:2], device=h.device, dtype=h.dtype), mask)  # (B, N)
        z = torch.einsum("bn,bne->be", attention, h)  # (B, E)
        return MILOutput(self.classifier(z), z, attention, h)


class MaxPoolMIL(_EmbeddedInstances):
    """Instance classifier, bag logits = max over instances per class.

    The bag embedding is the embedding of the instance that decides the positive class; the
    attention map is the softmax of the instances' positive-class logits (the instances the
    max looks at score highest)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)  # (B, N, E)
        scores = self.classifier(h)  # (B, N, C)
        if mask is not None:
            scores = scores.masked_fill(~mask[..., None], float("-inf"))
        logits, top = scores.max(dim=1)  # (B, C)
        decisive = top[:, -1]  # (B,) instance deciding the last (positive) class
        z = h[torch.arange(len(h), device=h.device), decisive]  # (B, E)
        attention = masked_softmax(scores[..., -1], mask)  # (B, N)
        return MILOutput(logits, z, attention)
