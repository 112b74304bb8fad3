"""TransMIL (Shao et al., NeurIPS 2021): correlated MIL with Nyström self-attention.

    h = ReLU(fc1(x))                                  (N, dim)
    square: append copies of the first instances so that N' = ceil(sqrt(N))^2
    prepend a class token                             (1 + N', dim)
    layer 1: h + NystromAttention(LayerNorm(h))
    PPEG: class token kept; the N' tokens reshaped to a sqrt(N') square, plus 7x7, 5x5 and 3x3
          depthwise convolutions (a conditional positional encoding)
    layer 2: as layer 1, computed for the class token's slot only (no other output of it
             reaches the logits)
    logits = fc2(LayerNorm(h)[class token])

Defaults follow the official release: 512-d, 8 heads of 64, 256 landmarks, 6 Moore-Penrose
iterations, a 33-tap residual convolution over values, dropout 0.1. A smaller size (``dim``,
``heads``, ``landmarks``) is what makes training on a CPU practical: the pseudo-inverse of the
landmark matrix costs 24 products of heads x (landmarks x landmarks) matrices per layer, plus
twice that in the backward pass, which is most of the default's time.

**Which output rows are kept.** Nyström attention pads the sequence at the *front* with zeros
to a multiple of the landmark count, and keeps n of the padded output rows. Which n differs
between versions of the nystrom-attention package:

- ``output_slice="first"``: version 0.0.9 keeps the first n rows, ``out[:, :n]``. The official
  TransMIL code pins that version and its checkpoints were trained with it. Token slot j then
  receives padded row j: the first slots (the class token's among them) receive the outputs of
  padding rows, every other slot the output of the token ``pad`` places before it.
- ``output_slice="last"`` (the default): versions from 0.0.10 on, and MHIM-MIL's vendored copy,
  keep ``out[:, -n:]``: slot j receives token j's own output.

**Per-instance attention** is the row of a layer's (approximated) attention matrix whose output
the class-token slot receives: the weights with which that layer pooled the values into the
class token, the ones the prediction used. With "last" it is the class token's own query row.
With "first" it is padded row 0: the query of a zero padding token whenever there is padding
(always, at the official size: 1 + side^2 is never a multiple of 256), whose Nyström row
approximates a uniform one. Either way the row's columns past the front padding are the keys
and values of the real tokens in order, so the weight at instance i is the weight given to
instance i's value. The weight of each appended copy is added back to the instance it copies;
negative values that the approximation can produce are clipped and the row renormalised over
the instances.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from napari_mil.models.contract import MILOutput, activation

OUTPUT_SLICES = ("last", "first")


def iterative_pinv(x: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of (B, H, m, m) matrices by the iteration of Razavi et al.
    (2014), as Nyströmformer: z <- z (13I - xz (15I - xz (7I - xz))) / 4."""
    b, h, m, _ = x.shape
    abs_x = x.abs()  # (B, H, m, m)
    # initial scale: the largest row and column sums over all heads of a bag, as the reference
    # implementation that official checkpoints were trained with (per bag, so bags stay independent)
    col, row = abs_x.sum(-1).amax((1, 2)), abs_x.sum(-2).amax((1, 2))  # (B,)
    z = (x.transpose(-1, -2) / (col * row)[:, None, None, None]).reshape(b * h, m, m)
    x = x.reshape(b * h, m, m)
    eye = torch.eye(m, device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = torch.bmm(x, z)  # (B*H, m, m)
        # the multiples of I are added inside the products (baddbmm) and the 1/4 is folded into
        # them (exact in binary): two (B*H, m, m) temporaries and their backward passes fewer
        inner = torch.baddbmm(15 * eye, xz, 7 * eye - xz, alpha=-1)  # 15I - xz (7I - xz)
        z = torch.bmm(z, torch.baddbmm(3.25 * eye, xz, inner, alpha=-0.25))  # z (13I - xz inner) / 4
    return z.view(b, h, m, m)


class NystromAttention(nn.Module):
    # training on longer sequences recomputes the attention matrices in the backward pass instead
    # of keeping them (see _recomputed_attention)
    recompute_above = 32_768

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, landmarks: int = 256,
                 pinv_iterations: int = 6, residual_kernel: int = 33, dropout: float = 0.1,
                 output_slice: str = "last"):
        super().__init__()
        if output_slice not in OUTPUT_SLICES:
            raise ValueError(f"output_slice must be 'last' or 'first', not {output_slice!r}")
        self.heads, self.dim_head, self.landmarks = heads, dim_head, landmarks
        self.pinv_iterations = pinv_iterations
        self.output_slice = output_slice  # "first": nystrom-attention 0.0.9 (official TransMIL)
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, heads * dim_head * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)

    def forward(self, x: torch.Tensor, query_index: int = 0,
                keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, dim) -> the outputs of the first ``keep`` token slots (B, keep, dim), all N by
        default, and the attention row whose output slot ``query_index`` receives, over the N
        real tokens, per head (B, H, N)."""
        b, n, _ = x.shape
        keep = n if keep is None else keep
        m = self.landmarks
        pad = (m - n % m) % m
        padded = n + pad
        first = pad if self.output_slice == "last" else 0  # the padded row that slot 0 receives
        # the front padding is zeros and to_qkv has no bias: padding its output is the same
        qkv = F.pad(self.to_qkv(x), (0, 0, pad, 0))  # (B, Np, 3*H*d)
        q, k, v = (t.view(b, padded, self.heads, self.dim_head).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (B, H, Np, d)
        q = q * self.scale
        per = padded // m
        q_l = q.reshape(b, self.heads, m, per, self.dim_head).mean(-2)  # (B, H, m, d) landmark queries
        k_l = k.reshape(b, self.heads, m, per, self.dim_head).mean(-2)  # (B, H, m, d)
        attn2_inv = iterative_pinv(torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1), self.pinv_iterations)  # (B, H, m, m)
        q_kept = q[:, :, first : first + keep]  # (B, H, keep, d)
        query = first + query_index
        q_query = q[:, :, query : query + 1]  # (B, H, 1, d)
        if keep == n and torch.is_grad_enabled() and padded > self.recompute_above:
            out, row = _recomputed_attention(q_kept, q_query, k, v, q_l, k_l, attn2_inv)
        else:
            attn1 = torch.softmax(q_kept @ k_l.transpose(-1, -2), dim=-1)  # (B, H, keep, m)
            attn3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # (B, H, m, Np)
            if 0 <= query_index < keep:
                row_weights = attn1[:, :, query_index : query_index + 1] @ attn2_inv  # (B, H, 1, m)
            else:
                row_weights = torch.softmax(q_query @ k_l.transpose(-1, -2), dim=-1) @ attn2_inv
            if keep <= self.dim_head:  # a few rows (the class token's in layer 2): (attn1 attn2_inv) first
                kept = row_weights if keep == 1 and query_index == 0 else attn1 @ attn2_inv
                out = kept @ (attn3 @ v)  # (B, H, keep, d)
            else:
                # attn1 @ (attn2_inv @ (attn3 @ v)): the other order would make a (keep, m) @ (m, m)
                # product, four times the multiplications of the whole chain
                out = attn1 @ (attn2_inv @ (attn3 @ v))  # (B, H, keep, d)
            row = row_weights @ attn3  # (B, H, 1, Np)
        out = out + self._residual(v, first, keep)
        out = out.transpose(1, 2).reshape(b, keep, self.heads * self.dim_head)  # (B, keep, H*d)
        return self.to_out(out), row[:, :, 0, pad:]  # row over the real tokens (B, H, N)

    def _residual(self, v: torch.Tensor, first: int, keep: int) -> torch.Tensor:
        """The residual convolution over the values (B, H, Np, d), at padded rows first .. first + keep."""
        padded, half = v.shape[2], self.res_conv.kernel_size[0] // 2
        lo, hi = first - half, first + keep + half  # the rows those outputs read
        window = F.pad(v[:, :, max(lo, 0) : min(hi, padded)], (0, 0, max(-lo, 0), max(hi - padded, 0)))
        window = window.contiguous(memory_format=torch.channels_last)  # mkldnn's fast layout
        return F.conv2d(window, self.res_conv.weight, groups=self.heads)  # (B, H, keep, d)


def _recomputed_attention(q_kept, q_query, k, v, q_l, k_l, attn2_inv) -> tuple[torch.Tensor, torch.Tensor]:
    """NystromAttention's output and attention row for long sequences in training: the same numbers,
    but no (Np, m) matrix is kept for the backward pass, which recomputes them a quarter of the heads
    at a time (memory of a 100k-instance bag: 6.2 instead of 10.6 GiB, measured when layer 2 still
    computed every token; it now computes the class token's slot only). The row has its own
    recomputation, so a backward pass that does not reach it does not hold its matrices."""

    def attend(q, k, v, q_l, k_l, attn2_inv):
        attn1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
        attn3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)
        return attn1 @ (attn2_inv @ (attn3 @ v))

    def attend_row(q, k, q_l, k_l, attn2_inv):
        attn1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
        return (attn1 @ attn2_inv) @ torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)

    outs, rows = [], []
    for qh, qqh, kh, vh, q_lh, k_lh, inv in zip(*(t.chunk(4, dim=1) for t in (q_kept, q_query, k, v, q_l, k_l, attn2_inv))):
        outs.append(checkpoint(attend, qh, kh, vh, q_lh, k_lh, inv, use_reentrant=False))
        rows.append(checkpoint(attend_row, qqh, kh, q_lh, k_lh, inv, use_reentrant=False))
    return torch.cat(outs, dim=1), torch.cat(rows, dim=1)


class TransLayer(nn.Module):
    def __init__(self, dim: int = 512, heads: int = 8, landmarks: int = 256, dropout: float = 0.1,
                 dim_head: int | None = None, output_slice: str = "last"):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads, dim_head or dim // heads, landmarks, 6, 33, dropout, output_slice)

    def forward(self, x, keep: int | None = None):
        """Tokens (B, N, dim) -> the first ``keep`` of them (all by default) after the layer, and
        the class-token slot's attention row (B, H, N)."""
        out, row = self.attn(self.norm(x), keep=keep)
        return x[:, : out.shape[1]] + out, row


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


ATTENTION_LAYERS = (0, 1, -1)  # the first layer, the second, their mean


class TransMIL(nn.Module):
    """Per-instance attention is read from a layer (0, 1 or -1 for their mean) and a head (None:
    the mean over heads), chosen per call: ``model(x, attention_layer=0, attention_head=2)``.
    Those given at construction (a checkpoint's model_cfg) are the defaults of a call that
    names none; no call changes the model."""

    CHOOSES_ATTENTION = True

    def __init__(self, in_dim: int, n_classes: int = 2, dim: int = 512, heads: int = 8, landmarks: int = 256,
                 dropout: float = 0.1, attention_layer: int = 1, attention_head: int | None = None,
                 embed_activation: str = "relu", positional: str = "transmil", dim_head: int | None = None,
                 output_slice: str = "last"):
        super().__init__()
        if positional not in ("transmil", "mhim"):
            raise ValueError(f"positional must be 'transmil' or 'mhim', not {positional!r}")
        if output_slice not in OUTPUT_SLICES:
            raise ValueError(f"output_slice must be 'last' or 'first', not {output_slice!r}")
        for name, value in (("dim", dim), ("heads", heads), ("landmarks", landmarks), ("dim_head", dim_head or 1)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive whole number, not {value!r}")
        if dim_head is None and dim % heads:
            raise ValueError(f"the width (dim={dim}) must be a multiple of the heads ({heads})")
        self.positional = positional  # 'mhim': MHIM-MIL's variant, for its checkpoints (see PPEG)
        # 'first': nystrom-attention 0.0.9's output rows, for official TransMIL checkpoints
        self.output_slice = output_slice
        self.fc1 = nn.Sequential(nn.Linear(in_dim, dim), activation(embed_activation))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, heads, landmarks, dropout, dim_head, output_slice)
        self.pos_layer = PPEG(dim)
        self.layer2 = TransLayer(dim, heads, landmarks, dropout, dim_head, output_slice)
        self.norm = nn.LayerNorm(dim)
        self.fc2 = nn.Linear(dim, n_classes)
        self._default_attention = self._checked_attention(attention_layer, attention_head, heads)

    @property
    def default_attention_layer(self) -> int:
        return self._default_attention[0]

    @property
    def default_attention_head(self) -> int | None:
        return self._default_attention[1]

    @staticmethod
    def _checked_attention(layer, head, heads: int) -> tuple[int, int | None]:
        if layer not in ATTENTION_LAYERS:
            raise ValueError(f"attention_layer must be 0, 1 or -1 (their mean), not {layer!r}")
        if head is not None and (int(head) != head or not 0 <= head < heads):
            raise ValueError(f"attention_head must be None (the mean) or a head from 0 to {heads - 1}, not {head!r}")
        return int(layer), None if head is None else int(head)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, attention_layer: int | None = None,
                attention_head: int | None = None) -> MILOutput:
        """Logits, embedding and the attention of ``attention_layer`` and ``attention_head`` (None:
        the defaults given at construction)."""
        layer = self.default_attention_layer if attention_layer is None else attention_layer
        head = self.default_attention_head if attention_head is None else attention_head
        choice = self._checked_attention(layer, head, self.layer1.attn.heads)
        if mask is not None and not bool(mask.all()):
            # TransMIL's positional encoding needs each bag's own square: run bags one by one
            outs = [self.forward(x[i : i + 1, : int(mask[i].sum())], None, *choice) for i in range(len(x))]
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
            h, row2 = self.layer2(h, keep=1)  # the class token's slot: nothing else reaches the logits
            z = self.norm(h)[:, 0]
            return MILOutput(self.fc2(z), z, self.instance_attention(row1, row2, n, 0, *choice))
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        h = torch.cat([h, h[:, :extra]], dim=1)  # (B, side^2, dim): copies of the first instances
        h = torch.cat([self.cls_token.expand(b, -1, -1), h], dim=1)  # (B, 1 + side^2, dim)
        h, row1 = self.layer1(h)
        h = self.pos_layer(h, side)
        h, row2 = self.layer2(h, keep=1)  # (B, 1, dim): the class token's slot, all the logits read
        z = self.norm(h)[:, 0]  # (B, dim)
        return MILOutput(self.fc2(z), z, self.instance_attention(row1, row2, n, extra, *choice))

    @staticmethod
    def instance_attention(row1: torch.Tensor, row2: torch.Tensor, n: int, extra: int, layer: int,
                           head: int | None) -> torch.Tensor:
        """Class-token attention rows of both layers (B, H, 1 + side^2) -> the per-instance
        attention (B, N) of ``layer`` and ``head`` (None: the mean over heads)."""
        rows = {0: row1, 1: row2, -1: (row1 + row2) / 2}[layer]
        rows = rows.mean(1) if head is None else rows[:, head]  # (B, 1 + side^2)
        tokens = rows[:, 1:]  # drop the class token's attention to itself
        att = tokens[:, :n].clone()
        att[:, :extra] += tokens[:, n:]  # the appended copies are the first instances again
        att = att.clamp_min(0)
        return att / att.sum(1, keepdim=True).clamp_min(1e-12)
