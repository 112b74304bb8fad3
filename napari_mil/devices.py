"""Where torch runs: one resolver for every part (extraction, training, prediction, the docks)."""

from __future__ import annotations

from typing import Any

from napari_mil.errors import NapariMilError


class DeviceError(NapariMilError, ValueError):
    """A device that does not exist on this machine, or a name torch does not know."""


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def available_devices() -> list[str]:
    """The device names this machine offers, for a device menu: auto, cpu, each CUDA device, mps."""
    import torch

    cuda = [f"cuda:{i}" if i else "cuda" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["auto", "cpu", *cuda, *(["mps"] if _mps_available() else [])]


def resolve_device(device: str | Any = "auto", cpu_warning: str | None = None):
    """A ``torch.device``: 'auto' picks CUDA, then Apple's MPS, then the CPU (warning with
    ``cpu_warning`` when given); a named device must exist here. Devices pass through."""
    import torch

    if not isinstance(device, str):
        return device
    if device != "auto":
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise DeviceError(f"unknown device {device!r}: {exc}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} asked for but CUDA is not available; use 'auto' or 'cpu'")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} asked for but this machine has {torch.cuda.device_count()} CUDA "
                              "device(s)")
        if dev.type == "mps" and not _mps_available():
            raise DeviceError("device 'mps' asked for but Apple's MPS is not available; use 'auto' or 'cpu'")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    if cpu_warning:
        import warnings

        warnings.warn(cpu_warning, stacklevel=2)
    return torch.device("cpu")
