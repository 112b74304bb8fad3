"""TransMIL (Shao et al., NeurIPS 2021): correlated MIL with Nyström self-attention.

    h = ReLU(fc1(x))                                  (N, 512)
    square: append copies of the first instances so that N' = ceil(sqrt(N))^2
    prepend a class token                             (1 + N', 512)
    layer 1: h + NystromAttention(LayerNorm(h))
    PPEG: class token kept; the N' tokens reshaped to a sqrt(N') square, plus 7x7, 5x5 and 3x3
          depthwise convolutions (a conditional positional encoding)
    layer 2: as layer 1
    logits = fc2(LayerNorm(h)[class token])

Defaults follow the official release: 512-d, 8 heads of 64, 256 landmarks, 6 Moore-Penrose
iterations, a 33-tap residual convolution over values, dropout 0.1. Nyström attention pads the
sequence at the *front* to a multiple of the landmark count. Per-instance attention is the
class-token row of a layer's (approximated) attention matrix, sliced past that front padding,
with the weight of each appended copy added back to the instance it copies; negative values
that the approximation can produce are clipped and the row renormalised over the instances.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from napari_mil.models.abmil import MILOutput, activation


def iterative_pinv(x: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of (B, H, m, m) matrices by the iteration of Razavi et al.
    (2014), as Nyströmformer."""
    abs_x = x.abs()  # (B, H, m, m)
    # initial scale: the largest row and column sums over all heads of a bag, as the reference
    # implementation that official checkpoints were trained with (per bag, so bags stay independent)
    col, row = abs_x.sum(-1).amax((1, 2)), abs_x.sum(-2).amax((1, 2))  # (B,)
    z = x.transpose(-1, -2) / (col * row)[:, None, None, None]
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    # training on longer sequences recomputes the attention matrices in the backward pass instead
    # of keeping them (see _recomputed_attention)
    recompute_above = 32_768

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, landmarks: int = 256,
                 pinv_iterations: int = 6, residual_kernel: int = 33, dropout: float = 0.1):
        super().__init__()
        self.heads, self.dim_head, self.landmarks = heads, dim_head, landmarks
        self.pinv_iterations = pinv_iterations
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, heads * dim_head * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)

    def forward(self, x: torch.Tensor, query_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, dim) -> output (B, N, dim) and the attention row of token ``query_index``
        over all N tokens, per head (B, H, N)."""
        b, n, _ = x.shape
        m = self.landmarks
        pad = (m - n % m) % m
        x = F.pad(x, (0, 0, pad, 0))  # front padding to a multiple of the landmarks
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)  # (B, Np, H*d) each
        q, k, v = (t.view(b, n + pad, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))  # (B, H, Np, d)
        q = q * self.scale
        per = (n + pad) // m
        q_l = q.reshape(b, self.heads, m, per, self.dim_head).mean(-2)  # (B, H, m, d) landmark queries
        k_l = k.reshape(b, self.heads, m, per, self.dim_head).mean(-2)  # (B, H, m, d)
        attn2_inv = iterative_pinv(torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1), self.pinv_iterations)  # (B, H, m, m)
        query = pad + query_index
        if torch.is_grad_enabled() and n + pad > self.recompute_above:
            out, row = _recomputed_attention(q, k, v, q_l, k_l, attn2_inv, query)
        else:
            attn1, attn3 = _landmark_attention(q, k, q_l, k_l)
            # attn1 @ (attn2_inv @ (attn3 @ v)): the product's other order would make an (Np, m) @ (m, m)
            # product, four times the multiplications of the whole chain
            out = attn1 @ (attn2_inv @ (attn3 @ v))  # (B, H, Np, d)
            row = (attn1[:, :, query : query + 1] @ attn2_inv) @ attn3  # (B, H, 1, Np)
        out = out + self.res_conv(v.contiguous(memory_format=torch.channels_last))  # mkldnn's fast layout
        out = out.transpose(1, 2).reshape(b, n + pad, self.heads * self.dim_head)  # (B, Np, H*d)
        out = self.to_out(out)[:, -n:]  # drop the front padding
        return out, row[:, :, 0, pad:]  # (B, H, N): the query's attention over the real tokens


def _landmark_attention(q, k, q_l, k_l) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries against landmark keys (B, H, Np, m) and landmark queries against keys (B, H, m, Np)."""
    return torch.softmax(q @ k_l.transpose(-1, -2), dim=-1), torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)


def _recomputed_attention(q, k, v, q_l, k_l, attn2_inv, query: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NystromAttention's output and attention row for long sequences in training: the same numbers,
    but no (Np, m) matrix is kept for the backward pass, which recomputes them a quarter of the heads
    at a time (memory of a 100k-instance bag: 6.2 instead of 10.6 GiB). The row has its own
    recomputation, so a backward pass that does not reach it does not hold its matrices."""

    def attend(q, k, v, q_l, k_l, attn2_inv):
        attn1, attn3 = _landmark_attention(q, k, q_l, k_l)
        return attn1 @ (attn2_inv @ (attn3 @ v))

    def attend_row(q, k, q_l, k_l, attn2_inv):
        attn1, attn3 = _landmark_attention(q, k, q_l, k_l)
        return (attn1[:, :, query : query + 1] @ attn2_inv) @ attn3

    outs, rows = [], []
    for qh, kh, vh, q_lh, k_lh, inv in zip(*(t.chunk(4, dim=1) for t in (q, k, v, q_l, k_l, attn2_inv))):
        outs.append(checkpoint(attend, qh, kh, vh, q_lh, k_lh, inv, use_reentrant=False))
        rows.append(checkpoint(attend_row, qh, kh, q_lh, k_lh, inv, use_reentrant=False))
    return torch.cat(outs, dim=1), torch.cat(rows, dim=1)


class TransLayer(nn.Module):
    def __init__(self, dim: int = 512, heads: int = 8, landmarks: int = 256, dropout: float = 0.1,
                 dim_head: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads, dim_head or dim // heads, landmarks, 6, 33, dropout)

    def forward(self, x):
        out, row = self.attn(self.norm(x))
        return x + out, row


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7x7, 5x5 and 3x3 convolutions on the
    square-reshaped instance tokens, added to them; the class token passes through."""

    def __init__(self, dim: int = 512):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, feat = x[:, :1], x[:, 1:]  # (B, 1, C), (B, side^2, C)
        return torch.cat([cls, self.encode(feat, side)], dim=1)

    def encode(self, feat: torch.Tensor, side: int) -> torch.Tensor:
        """(B, side^2, C) tokens -> the same tokens plus their positional encoding.

        x + conv7(x) + conv5(x) + conv3(x) is computed as one depthwise 7x7 convolution whose
        kernel is the sum of the three (centred) plus the identity: the same linear map, a third
        of the work, and the parameters and their gradients are those of the three convolutions."""
        b, _, c = feat.shape
        grid = feat.transpose(1, 2).reshape(b, c, side, side)  # (B, C, side, side), a channels-last view
        identity = F.pad(feat.new_ones(c, 1, 1, 1), (3, 3, 3, 3))
        kernel = self.proj.weight + F.pad(self.proj1.weight, (1, 1, 1, 1)) + F.pad(self.proj2.weight, (2, 2, 2, 2))
        bias = self.proj.bias + self.proj1.bias + self.proj2.bias
        grid = F.conv2d(grid, kernel + identity, bias, padding=3, groups=c)
        return grid.flatten(2).transpose(1, 2)

    def encode_padded(self, feat: torch.Tensor) -> torch.Tensor:
        """MHIM-MIL's placement: the N instance tokens are squared inside the module (copies of
        the first tokens, then zeros up to at least 7 x 7), encoded, and cut back to N."""
        b, n, c = feat.shape
        side = math.ceil(math.sqrt(n))
        padded = torch.cat([feat, feat[:, : side * side - n]], dim=1)
        if side < 7:
            side = 7
            padded = torch.cat([padded, padded.new_zeros(b, side * side - padded.shape[1], c)], dim=1)
        return self.encode(padded, side)[:, :n]


class TransMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int = 2, dim: int = 512, heads: int = 8, landmarks: int = 256,
                 dropout: float = 0.1, attention_layer: int = 1, attention_head: int | None = None,
                 embed_activation: str = "relu", positional: str = "transmil", dim_head: int | None = None):
        super().__init__()
        if positional not in ("transmil", "mhim"):
            raise ValueError(f"positional must be 'transmil' or 'mhim', not {positional!r}")
        self.positional = positional  # 'mhim': MHIM-MIL's variant, for its checkpoints (see PPEG)
        self.fc1 = nn.Sequential(nn.Linear(in_dim, dim), activation(embed_activation))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, heads, landmarks, dropout, dim_head)
        self.pos_layer = PPEG(dim)
        self.layer2 = TransLayer(dim, heads, landmarks, dropout, dim_head)
        self.norm = nn.LayerNorm(dim)
        self.fc2 = nn.Linear(dim, n_classes)
        self.attention_layer = attention_layer  # 0: first layer, 1: second (default), -1: their mean
        self.attention_head = attention_head  # None: mean over heads

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        if mask is not None and not bool(mask.all()):
            # TransMIL's positional encoding needs each bag's own square: run bags one by one
            outs = [self.forward(x[i : i + 1, : int(mask[i].sum())]) for i in range(len(x))]
            attention = torch.zeros(mask.shape, dtype=outs[0].attention.dtype, device=x.device)
            for i, o in enumerate(outs):
                attention[i, : o.attention.shape[1]] = o.attention[0]
            return MILOutput(torch.cat([o.logits for o in outs]), torch.cat([o.embedding for o in outs]), attention)
        h = self.fc1(x)  # (B, N, dim)
        b, n, _ = h.shape
        if self.positional == "mhim":  # no squaring of the sequence; PPEG squares internally
            h = torch.cat([self.cls_token.expand(b, -1, -1), h], dim=1)  # (B, 1 + N, dim)
            h, row1 = self.layer1(h)
            h = torch.cat([h[:, :1], self.pos_layer.encode_padded(h[:, 1:])], dim=1)
            h, row2 = self.layer2(h)
            z = self.norm(h)[:, 0]
            return MILOutput(self.fc2(z), z, self.instance_attention(row1, row2, n, 0))
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        h = torch.cat([h, h[:, :extra]], dim=1)  # (B, side^2, dim): copies of the first instances
        h = torch.cat([self.cls_token.expand(b, -1, -1), h], dim=1)  # (B, 1 + side^2, dim)
        h, row1 = self.layer1(h)
        h = self.pos_layer(h, side)
        h, row2 = self.layer2(h)
        z = self.norm(h)[:, 0]  # (B, dim)
        return MILOutput(self.fc2(z), z, self.instance_attention(row1, row2, n, extra))

    def instance_attention(self, row1: torch.Tensor, row2: torch.Tensor, n: int, extra: int) -> torch.Tensor:
        """Class-token attention (B, H, 1 + side^2) -> per-instance attention (B, N)."""
        rows = {0: row1, 1: row2, -1: (row1 + row2) / 2}[self.attention_layer]
        rows = rows.mean(1) if self.attention_head is None else rows[:, self.attention_head]  # (B, 1 + side^2)
        tokens = rows[:, 1:]  # drop the class token's attention to itself
        att = tokens[:, :n].clone()
        att[:, :extra] += tokens[:, n:]  # the appended copies are the first instances again
        att = att.clamp_min(0)
        return att / att.sum(1, keepdim=True).clamp_min(1e-12)
