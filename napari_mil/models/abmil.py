"""Attention-based MIL (Ilse, Tomczak & Welling, ICML 2018).

    h_k' = ReLU(W h_k)                          instance embedding
    a_k  = softmax_k( w^T tanh(V h_k') )        ungated
    a_k  = softmax_k( w^T (tanh(V h_k') * sigmoid(U h_k')) )   gated
    z    = sum_k a_k h_k'                       bag embedding -> classifier
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MILOutput:
    logits: torch.Tensor  # (B, C)
    embedding: torch.Tensor  # (B, E)
    attention: torch.Tensor  # (B, N), sums to 1 over the unmasked instances


class ABMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int = 2, embed_dim: int = 128, attn_dim: int = 128,
                 gated: bool = False, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(embed_dim, attn_dim)
        self.attn_u = nn.Linear(embed_dim, attn_dim) if gated else None
        self.attn_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)  # (B, N, E)
        a = torch.tanh(self.attn_v(h))  # (B, N, A)
        if self.attn_u is not None:
            a = a * torch.sigmoid(self.attn_u(h))
        scores = self.attn_w(a).squeeze(-1)  # (B, N)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)  # (B, N)
        z = torch.einsum("bn,bne->be", attention, h)  # (B, E)
        return MILOutput(self.classifier(z), z, attention)
