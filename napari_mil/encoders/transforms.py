"""Eval transforms as torch ops on uint8 batches, so they run on the GPU after a cheap uint8
copy and need no torchvision."""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BatchTransform:
    """uint8 (B, H, W, 3) -> float (B, 3, S, S): resize (antialiased), centre crop, normalise."""

    def __init__(self, resize: int | None, crop: int | None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 interpolation: str = "bilinear"):
        self.resize = resize
        self.crop = crop
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.interpolation = interpolation
        self._stats = {}

    def __call__(self, batch):
        import torch
        import torch.nn.functional as F

        x = batch.permute(0, 3, 1, 2).float().div_(255.0)
        if self.resize is not None:
            h, w = x.shape[-2:]
            if self.crop is not None and self.crop != self.resize:  # resize the short side
                scale = self.resize / min(h, w)
                size = (round(h * scale), round(w * scale))
            else:
                size = (self.resize, self.resize)
            if size != (h, w):
                x = F.interpolate(x, size=size, mode=self.interpolation, antialias=True, align_corners=False)
        if self.crop is not None:
            h, w = x.shape[-2:]
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
            x = x[..., top : top + self.crop, left : left + self.crop]
        key = (x.device, x.dtype)
        if key not in self._stats:
            self._stats[key] = (
                torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1),
                torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1),
            )
        mean, std = self._stats[key]
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"BatchTransform(resize={self.resize}, crop={self.crop}, mean={self.mean}, std={self.std}, {self.interpolation})"
