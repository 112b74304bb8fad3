"""Attention-based MIL (Ilse, Tomczak & Welling, ICML 2018) and its extreme-learning variant.

ABMIL:
    h_k' = ReLU(W h_k)                                       instance embedding (E)
    a_k  = softmax_k( w^T tanh(V h_k') )                     ungated
    a_k  = softmax_k( w^T (tanh(V h_k') * sigmoid(U h_k')) ) gated
    z    = sum_k a_k h_k'                                    bag embedding -> linear classifier

Attention-based Extreme MIL (arXiv 2503.10510): V is a random projection, frozen at its
initialisation as in an extreme learning machine, and applied to the input features; only w
and the classifier are trained. With fixed attention the classifier is a linear model of the
bag embedding, so it can also be fitted in closed form (ridge regression).
"""

from __future__ import annotations

import torch
from torch import nn

from napari_mil.models.contract import MILOutput, activation, masked_softmax


class ABMIL(nn.Module):
    """Ilse et al.'s ABMIL. ``embed_activation``, ``attn_activation`` and ``attn_bias`` exist to
    reproduce models trained elsewhere: MHIM-MIL's ABMIL uses ReLU (or GELU) and bias-free
    attention layers, CLAM's attention network the paper's tanh with biases."""

    def __init__(self, in_dim: int, n_classes: int = 2, embed_dim: int = 128, attn_dim: int = 128,
                 gated: bool = False, dropout: float = 0.25, embed_activation: str = "relu",
                 attn_activation: str = "tanh", attn_bias: bool = True):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, embed_dim), activation(embed_activation), nn.Dropout(dropout))
        self.attn_v = nn.Linear(embed_dim, attn_dim, bias=attn_bias)
        self.attn_act = activation(attn_activation)
        self.attn_u = nn.Linear(embed_dim, attn_dim, bias=attn_bias) if gated else None
        self.attn_w = nn.Linear(attn_dim, 1, bias=attn_bias)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        h = self.embed(x)  # (B, N, E)
        a = self.attn_act(self.attn_v(h))  # (B, N, A)
        if self.attn_u is not None:
            a = a * torch.sigmoid(self.attn_u(h))
        attention = masked_softmax(self.attn_w(a).squeeze(-1), mask)  # (B, N)
        z = torch.einsum("bn,bne->be", attention, h)  # (B, E)
        return MILOutput(self.classifier(z), z, attention, h)


class ExtremeABMIL(nn.Module):
    """ABMIL with a frozen random attention projection V on the input features.

    Trained: the attention vector w (attn_dim + 1) and the classifier (in_dim + 1) x C.
    """

    def __init__(self, in_dim: int, n_classes: int = 2, attn_dim: int = 128, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        # the random projection: a parameter that is never trained (counted in the total, saved
        # with the model, excluded from the optimiser by requires_grad=False)
        self.attn_v = nn.Linear(in_dim, attn_dim)
        with torch.no_grad():
            self.attn_v.weight.copy_(torch.randn(attn_dim, in_dim, generator=gen) / in_dim**0.5)
            self.attn_v.bias.zero_()
        self.attn_v.requires_grad_(False)
        self.attn_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(in_dim, n_classes)

    def attention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        a = torch.tanh(self.attn_v(x))  # (B, N, A)
        return masked_softmax(self.attn_w(a).squeeze(-1), mask)  # (B, N)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        attention = self.attention(x, mask)
        z = torch.einsum("bn,bnd->bd", attention, x)  # (B, D)
        return MILOutput(self.classifier(z), z, attention, x)

    @torch.no_grad()
    def fit_classifier_ridge(self, bags: list[torch.Tensor], labels: torch.Tensor, ridge: float = 1e-2) -> None:
        """Closed-form classifier for the current attention: ridge regression of one-hot labels
        (centred) on the bag embeddings. Near-instant, so the viewer can refit on every edit."""
        z = torch.stack([self.forward(b[None]).embedding[0] for b in bags])  # (M, D)
        targets = torch.nn.functional.one_hot(labels.long(), self.classifier.out_features).to(z.dtype)  # (M, C)
        z_mean, t_mean = z.mean(0), targets.mean(0)
        zc, tc = z - z_mean, targets - t_mean
        gram = zc.T @ zc + ridge * len(z) * torch.eye(z.shape[1], dtype=z.dtype)
        weight = torch.linalg.solve(gram, zc.T @ tc)  # (D, C)
        self.classifier.weight.copy_(weight.T)
        self.classifier.bias.copy_(t_mean - z_mean @ weight)
