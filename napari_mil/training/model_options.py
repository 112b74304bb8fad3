"""Model sizes the user may set (``TrainConfig.model_cfg``), checked before training starts, for
the CLI (``train --transmil-dim/--transmil-heads/--transmil-landmarks``) and the Retrain dock."""

from __future__ import annotations

from napari_mil.errors import NapariMilError

TRANSMIL_DEFAULTS = {"dim": 512, "heads": 8, "landmarks": 256}  # the official TransMIL's


def transmil_options(dim: int | None = None, heads: int | None = None, landmarks: int | None = None) -> dict:
    """``model_cfg`` for TransMIL with the sizes given (None keeps the default): the embedding
    width ``dim``, the attention ``heads`` (each gets dim / heads channels) and the Nyström
    ``landmarks``. Sizes it cannot be built with raise a NapariMilError."""
    given = {k: v for k, v in {"dim": dim, "heads": heads, "landmarks": landmarks}.items() if v is not None}
    sizes = {**TRANSMIL_DEFAULTS, **given}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NapariMilError(f"TransMIL's {name} must be a whole number of at least 1, not {value!r}")
    if sizes["dim"] % sizes["heads"]:
        raise NapariMilError(f"TransMIL's dim ({sizes['dim']}) must be a multiple of its heads ({sizes['heads']}): "
                             "each head takes dim / heads channels")
    if sizes["dim"] > 8192 or sizes["landmarks"] > 65536:
        raise NapariMilError(f"TransMIL sizes dim={sizes['dim']}, heads={sizes['heads']}, "
                             f"landmarks={sizes['landmarks']} are out of range (dim up to 8192, landmarks up to 65536)")
    return given
