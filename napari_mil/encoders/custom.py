"""Users' own encoders: a TorchScript file, or a Python builder named as ``package.module:function``,
and the checked loading of weights files shared by the built-in builders."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from napari_mil.encoders.base import Encoder, file_hash
from napari_mil.errors import EncoderError


def load_state_dict_file(path: str | Path) -> dict:
    """A state dict from .safetensors, or from .pt/.pth/.bin with ``weights_only=True``
    (no arbitrary pickles). Checkpoints that wrap it in 'state_dict' or 'model' are unwrapped."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise EncoderError("reading .safetensors needs the safetensors package: pip install safetensors") from None
    except Exception as exc:
        raise EncoderError(f"cannot read weights file {path.name}: {type(exc).__name__}: {str(exc)[:200]}") from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise EncoderError(f"{path.name} holds no state dict")
    return state


def load_state_dict_checked(model, path: str | Path, encoder_name: str, strip_prefixes=("module.", "model.")) -> None:
    """Load weights into ``model`` or raise EncoderError naming what does not match."""
    state = load_state_dict_file(path)
    for prefix in strip_prefixes:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(f"{len(wrong_shape)} of another shape (e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise EncoderError(f"{Path(path).name} does not fit {encoder_name}: " + "; ".join(parts))
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def _probe_dim(model, input_size: int, device) -> int:
    import torch

    with torch.inference_mode():
        out = model(torch.zeros(1, 3, input_size, input_size, device=device))
    if out.ndim != 2:
        raise EncoderError(f"the model returns shape {tuple(out.shape)}; a patch encoder must return (batch, features)")
    return int(out.shape[1])


def torchscript_encoder(path: Path, device) -> Encoder:
    """A TorchScript patch encoder. A JSON sidecar (``model.pt.json``) may give ``input_size``,
    ``mean``, ``std`` and ``precision`` (float32, float16, bfloat16); the defaults are 224 px
    with ImageNet statistics in float32."""
    import torch

    from napari_mil.encoders.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchTransform

    if not path.exists():
        raise EncoderError(f"TorchScript file {path} does not exist")
    try:
        model = torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:
        raise EncoderError(f"{path.name} is not a TorchScript model: {str(exc).splitlines()[0][:200]}") from None
    sidecar = path.with_name(path.name + ".json")
    cfg = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    size = int(cfg.get("input_size", 224))
    precision = getattr(torch, cfg.get("precision", "float32"))
    transform = BatchTransform(size, None, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
    dim = _probe_dim(model, size, device)
    return Encoder(f"torchscript:{path.name}", model, transform, precision, dim, size, file_hash(path), device,
                   "user TorchScript model")


def python_encoder(target: str, weights, device) -> Encoder:
    """``package.module:function``; the function takes (weights, device) and returns an
    Encoder, or TRIDENT-style (model, transform, precision) whose output size is probed."""
    import torch

    module_name, _, attr = target.partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise EncoderError(f"cannot import encoder builder {target!r}: {exc}") from None
    built = builder(weights, device)
    if isinstance(built, Encoder):
        return built
    try:
        model, transform, precision = built
    except (TypeError, ValueError):
        raise EncoderError(f"{target} must return an Encoder or (model, transform, precision)") from None
    model = model.to(device).eval()
    size = int(getattr(transform, "crop", None) or getattr(transform, "resize", None) or 224)
    dim = _probe_dim(model, size, device)
    digest = file_hash(weights) if weights else f"module:{target}"
    return Encoder(target, model, transform, precision or torch.float32, dim, size, digest, device, "user Python encoder")
