"""Offline encoders that need no download: for the demo, the tests and machines without weights.

``hne_stats`` (the default) describes a patch by its stain and texture: colour deconvolution
into haematoxylin and eosin (Ruifrok & Johnston's optical-density vectors), the distribution
of each stain, colour statistics, and haematoxylin texture at nuclear scales (difference of
box blurs, gradient energy, local-maximum density). It is a fixed function: nothing is
learned, so it knows nothing a pretrained pathology model knows (cell types, architecture,
context beyond the patch). It separates what differs in stain and nuclear density, which is
what the synthetic cohort encodes, and it runs at thousands of patches per second on a CPU.

``random_cnn`` is the extreme-learning-machine alternative: a small convolutional network with
fixed random weights (seeded), pooled globally. It was measured against ``hne_stats`` when the
default was chosen (docs/encoders.md).
"""

from __future__ import annotations

from napari_mil.encoders.base import Encoder, register_encoder

HNE_INPUT = 64  # patches are resized to this side: a 256 px patch at 20x becomes 2 µm/px, nuclei 2-7 px
# Ruifrok & Johnston (2001) optical-density vectors: haematoxylin, eosin, and a residual
RUIFROK = ((0.650, 0.704, 0.286), (0.072, 0.990, 0.105), (0.268, 0.570, 0.776))
STAIN_LEVELS = (0.15, 0.3, 0.5, 0.8, 1.2)


def _hne_module():
    import torch
    import torch.nn.functional as F
    from torch import nn

    def _box1d(x, k, dim):  # running mean over k (odd) along dim, by cumulative sums: O(1) per pixel
        r = k // 2
        n = x.shape[dim]
        pad = [0, 0, 0, 0]  # F.pad order: (left, right, top, bottom)
        start = (3 - dim) * 2
        pad[start : start + 2] = [r + 1, r]
        c = F.pad(x, pad).cumsum(dim)
        total = c.narrow(dim, k, n) - c.narrow(dim, 0, n)
        idx = torch.arange(n, device=x.device)
        count = (torch.clamp(idx + r, max=n - 1) - torch.clamp(idx - r, min=0) + 1).to(x.dtype)
        shape = [1, 1, 1, 1]
        shape[dim] = n
        return total / count.view(shape)

    def _box(x, k):  # separable box blur, same size, mean over the in-image part of the window
        return _box1d(_box1d(x, k, 2), k, 3)

    class HnEStats(nn.Module):
        """(B, 3, S, S) RGB in [0, 1] -> (B, 38) stain and texture statistics.

        Any change to what it computes must bump the version in ``weights_hash`` (part of the
        cache key, with the input size and transform).
        """

        def __init__(self):
            super().__init__()
            m = torch.tensor(RUIFROK)
            m = m / m.norm(dim=1, keepdim=True)
            # OD (rgb) -> haematoxylin and eosin concentrations, as a 1x1 convolution
            self.register_buffer("unmix", torch.linalg.inv(m)[:, :2].T.contiguous().view(2, 3, 1, 1))
            self.register_buffer("levels", torch.tensor(STAIN_LEVELS).view(1, 1, -1, 1))
            self.register_buffer("dog_levels", torch.tensor((0.1, 0.3)).view(1, 1, -1, 1))

        def forward(self, x):  # (B, 3, S, S)
            od = -torch.log((x * 255.0 + 1.0) / 256.0)  # (B, 3, S, S)
            conc = F.conv2d(od, self.unmix)  # (B, 2, S, S): H, E
            hh = conc[:, :1]  # (B, 1, S, S) haematoxylin
            mn, mx = torch.aminmax(x, dim=1, keepdim=True)
            sat = (mx - mn) / mx.clamp_min(1e-3)  # (B, 1, S, S)
            b3, b5, b9, b19 = (_box(hh, k) for k in (3, 5, 9, 19))
            dogs = torch.cat([hh - b3, b3 - b9, b5 - b19], 1)  # (B, 3, S, S): nuclear scales
            # every per-pixel map in one tensor: one pass each for mean, mean square, thresholds
            maps = torch.cat([conc, x, sat, dogs], 1).flatten(2)  # (B, 9, N): H, E, R, G, B, sat, 3 DoG
            n = maps.shape[2]
            mean = maps.mean(2)  # (B, 9)
            std = ((maps * maps).mean(2) - mean * mean).clamp_min(0).sqrt()  # (B, 9)
            stain_levels = (maps[:, :2, None, :] > self.levels).sum(3, dtype=maps.dtype) / n  # (B, 2, 5)
            dog_maps = maps[:, 6:]  # (B, 3, N)
            dog_pos = dog_maps.clamp_min(0).mean(2)  # (B, 3)
            dog_frac = (dog_maps[:, :, None, :] > self.dog_levels).sum(3, dtype=maps.dtype) / n  # (B, 3, 2)
            tissue = (od.sum(1) > 0.3).flatten(1).sum(1, keepdim=True, dtype=maps.dtype) / n  # (B, 1)
            grads = []
            for k in (1, 2, 4):  # gradient energy of the haematoxylin image at three scales
                hk = F.avg_pool2d(hh, k) if k > 1 else hh
                gy = (hk[..., 1:, :] - hk[..., :-1, :]).abs().flatten(1).mean(1, keepdim=True)
                gx = (hk[..., :, 1:] - hk[..., :, :-1]).abs().flatten(1).mean(1, keepdim=True)
                grads.append(gx + gy)
            per_dog = torch.stack([dog_pos, std[:, 6:], dog_frac[..., 0], dog_frac[..., 1]], 2).flatten(1)  # (B, 12)
            return torch.cat([
                tissue,
                mean[:, :1], std[:, :1], stain_levels[:, 0],  # haematoxylin
                mean[:, 1:2], std[:, 1:2], stain_levels[:, 1],  # eosin
                mean[:, 2:5], std[:, 2:5],  # RGB
                mean[:, 5:6], std[:, 5:6],  # saturation
                per_dog, *grads,
            ], 1)  # (B, 38)

    return HnEStats()


@register_encoder("hne_stats", dim=38, description="H&E stain and texture statistics; offline, the default")
def build_hne_stats(weights=None, device=None) -> Encoder:
    import torch

    from napari_mil.encoders.transforms import BatchTransform

    if weights is not None:
        from napari_mil.errors import EncoderError

        raise EncoderError("hne_stats is a fixed function and takes no weights file")
    model = _hne_module().to(device).eval()
    transform = BatchTransform(resize=HNE_INPUT, crop=None, mean=(0, 0, 0), std=(1, 1, 1))
    return Encoder("hne_stats", model, transform, torch.float32, 38, HNE_INPUT, "hne_stats-v2", device,
                   "H&E stain and texture statistics (no learned weights)")


def _random_cnn(seed: int = 0):
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    layers, channels = [], 3
    for width in (32, 64, 128, 256):
        conv = nn.Conv2d(channels, width, 3, stride=2, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (9 * channels)) ** 0.5)
            conv.bias.zero_()
        layers += [conv, nn.ReLU(inplace=True)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


@register_encoder("random_cnn", dim=256, description="4-layer CNN with fixed random weights (ELM-style); offline")
def build_random_cnn(weights=None, device=None) -> Encoder:
    import torch

    from napari_mil.encoders.transforms import BatchTransform

    model = _random_cnn().to(device).eval()
    if weights is not None:
        from napari_mil.encoders.custom import load_state_dict_checked

        load_state_dict_checked(model, weights, "random_cnn")
    transform = BatchTransform(resize=HNE_INPUT, crop=None)
    return Encoder("random_cnn", model, transform, torch.float32, 256, HNE_INPUT, "seed-0", device,
                   "random convolutional features")
