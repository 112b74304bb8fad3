"""Feature normalisation fitted on the training bags, stored in the checkpoint and applied by the
model itself wherever it predicts.

Hand-crafted features such as ``hne_stats`` have per-dimension spreads from 1e-3 to 1, which an
MLP with one learning rate barely trains on; and slide-to-slide stain differences shift every
patch of a slide alike, which can swamp a small lesion's signal in pooled features. Two kinds:

- ``global``: z-scores with the mean and standard deviation of all training instances;
- ``slide``: each bag centred on its own mean (a stain shift moves the whole bag, and centring
  removes it, with the bag's overall level), then divided by the standard deviation of the
  centred training instances.

The normaliser is attached to a model as a forward pre-hook, so every call of the model (the
trainer, the CLI, the docks, the exports) sees normalised features, and its statistics travel
in the checkpoint's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from napari_mil.errors import NapariMilError

KINDS = ("none", "global", "slide")


class NormalisationError(NapariMilError):
    """Normalisation statistics that are missing, malformed or do not fit the features."""


@dataclass
class FeatureNormaliser:
    kind: str  # "global" or "slide"
    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)

    @classmethod
    def fit(cls, kind: str, bags) -> FeatureNormaliser | None:
        """Statistics of the training bags (objects with ``features`` (N, D)); None for 'none'."""
        if kind not in KINDS:
            raise NormalisationError(f"normalisation must be one of {', '.join(KINDS)}, not {kind!r}")
        if kind == "none":
            return None
        stacked = np.concatenate([b.features for b in bags]).astype(np.float64)
        mean = stacked.mean(0)
        if kind == "slide":
            stacked = np.concatenate([b.features - b.features.mean(0) for b in bags]).astype(np.float64)
        std = stacked.std(0)
        std = np.where(std > 1e-8, std, 1.0)  # constant features stay as they are, centred
        return cls(kind, mean.astype(np.float32), std.astype(np.float32))

    def to_meta(self) -> dict:
        return {"kind": self.kind, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_meta(cls, meta: dict | None, feature_dim: int | None = None) -> FeatureNormaliser | None:
        """The normaliser a checkpoint recorded (None when it has none); refuses statistics of
        another dimension than ``feature_dim`` or that are not finite."""
        if not meta:
            return None
        try:
            kind, mean, std = meta["kind"], np.asarray(meta["mean"], np.float32), np.asarray(meta["std"], np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise NormalisationError(f"the checkpoint's normalisation statistics are malformed ({exc})") from None
        if kind not in KINDS[1:] or mean.ndim != 1 or mean.shape != std.shape:
            raise NormalisationError(f"the checkpoint's normalisation ({kind!r}, {mean.shape} mean, {std.shape} std) "
                                     "is malformed")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise NormalisationError("the checkpoint's normalisation statistics are not finite and positive")
        if feature_dim is not None and len(mean) != feature_dim:
            raise NormalisationError(f"the checkpoint normalises {len(mean)}-d features, these have {feature_dim}: "
                                     "they come from another encoder than the one it was trained on")
        return cls(kind, mean, std)

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise bags (B, N, D); ``mask`` (B, N) marks the real instances of padded bags."""
        mean = torch.as_tensor(self.mean, device=x.device, dtype=x.dtype)
        std = torch.as_tensor(self.std, device=x.device, dtype=x.dtype)
        if self.kind == "slide":
            if mask is None:
                centre = x.mean(1, keepdim=True)  # (B, 1, D)
            else:
                w = mask[..., None].to(x.dtype)
                centre = (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
            return (x - centre) / std
        return (x - mean) / std

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        """Make ``model`` normalise its input on every call (replacing a normaliser it had)."""
        detach(model)

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.pop("x")
            mask = args[1] if len(args) > 1 else kwargs.get("mask")
            return (self(x, mask), *args[1:]), kwargs

        model._napari_mil_normaliser_handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        model.feature_normaliser = self
        return model


def detach(model: torch.nn.Module) -> None:
    handle = getattr(model, "_napari_mil_normaliser_handle", None)
    if handle is not None:
        handle.remove()
    model._napari_mil_normaliser_handle = None
    model.feature_normaliser = None


def normaliser_of(model: torch.nn.Module) -> FeatureNormaliser | None:
    return getattr(model, "feature_normaliser", None)
