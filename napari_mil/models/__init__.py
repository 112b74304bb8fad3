"""MIL models and their registry.

Every model maps a bag (B, N, D) with an optional padding mask (B, N; True = real instance)
to a ``MILOutput``: logits (B, C), bag embedding (B, E) and per-instance attention (B, N)
that sums to 1 over the real instances.
"""

from __future__ import annotations

from collections.abc import Callable

from napari_mil.errors import NapariMilError

_MODELS: dict[str, Callable] = {}
_LABELS: dict[str, str] = {}  # the names shown in the docks
_BUILTINS_LOADED = False


def register_model(name: str, label: str | None = None):
    def decorate(factory):
        _MODELS[name] = factory
        _LABELS[name] = label or name
        return factory

    return decorate


def list_models() -> list[str]:
    _load_builtins()
    return sorted(_MODELS)


def model_label(name: str) -> str:
    """How a registered model is shown to users ("gated ABMIL" for abmil_gated)."""
    _load_builtins()
    return _LABELS.get(name, name)


def create_model(name: str, in_dim: int, n_classes: int = 2, **cfg):
    """Build a registered model; unknown names and options raise with the valid ones listed."""
    _load_builtins()
    if name not in _MODELS:
        raise NapariMilError(f"unknown model {name!r}; choose one of {', '.join(sorted(_MODELS))}")
    try:
        return _MODELS[name](in_dim=in_dim, n_classes=n_classes, **cfg)
    except (TypeError, ValueError) as exc:
        raise NapariMilError(f"model {name!r}: {exc}") from None


def parameter_counts(model) -> tuple[int, int]:
    """(total, trainable) parameters; frozen buffers such as Extreme ABMIL's V count in neither."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from napari_mil.models.abmil import ABMIL, ExtremeABMIL
    from napari_mil.models.pooling import MaxPoolMIL, MeanPoolMIL
    from napari_mil.models.transmil import TransMIL

    builtins = {
        "abmil": ("ABMIL", lambda **kw: ABMIL(gated=False, **kw)),
        "abmil_gated": ("gated ABMIL", lambda **kw: ABMIL(gated=True, **kw)),
        "extreme_abmil": ("Extreme ABMIL", ExtremeABMIL),
        "mean_pool": ("mean pooling", MeanPoolMIL),
        "max_pool": ("max pooling", MaxPoolMIL),
        "transmil": ("TransMIL", TransMIL),
    }
    for name, (label, factory) in builtins.items():
        if name not in _MODELS:
            register_model(name, label)(factory)
