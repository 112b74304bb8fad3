"""Checkpoints: a model's weights (safetensors, never pickle) and the JSON that rebuilds it,
the MHIM-MIL teacher kept beside its student, and other code's checkpoints (the official
TransMIL, MHIM-MIL and CLAM ``.pt`` files, read by ``napari_mil.models.interop``).

    <checkpoint>.json / .safetensors            the model (the student of an MHIM-MIL run)
    <checkpoint>_teacher.json / .safetensors    its teacher, when trained with MHIM-MIL
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from napari_mil.atomic import atomic_path
from napari_mil.encoders import DEFAULT_ENCODER
from napari_mil.errors import NapariMilError
from napari_mil.models import create_model
from napari_mil.training.normalise import FeatureNormaliser, NormalisationError


class CheckpointError(NapariMilError):
    """A checkpoint that does not exist, is not ours, or does not fit the features."""


def jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))


def teacher_path(checkpoint: str | Path) -> Path:
    """Where an MHIM-MIL run keeps its teacher: beside the student, with ``_teacher`` appended."""
    base = Path(checkpoint)
    if base.suffix in (".json", ".safetensors"):
        base = base.with_suffix("")
    return base.with_name(base.name + "_teacher")


def load_teacher(checkpoint: str | Path, meta: dict, device: str = "cpu") -> torch.nn.Module | None:
    """The teacher saved with an MHIM-MIL student (None for plain training)."""
    if not meta.get("teacher"):
        return None
    teacher, _ = load_checkpoint(teacher_path(checkpoint), feature_dim=meta["in_dim"], device=device)
    return teacher


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict) -> Path:
    """``path.safetensors`` (weights) and ``path.json`` (what to rebuild it with), both atomic."""
    from safetensors.torch import save_file

    base = Path(path)
    weights, config = base.with_suffix(".safetensors"), base.with_suffix(".json")
    with atomic_path(config) as tmp_c, atomic_path(weights) as tmp_w:  # the weights land first
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp_w))
        tmp_c.write_text(json.dumps(jsonable({"format": "napari-mil-checkpoint-1", **meta}), indent=2))
    return base


FOREIGN_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def load_checkpoint(path: str | Path, feature_dim: int | None = None, device: str = "cpu",
                    part: str = "student", **foreign_options) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from ``path.json`` and ``path.safetensors``; refuse features of another
    dimension and weights of another architecture with a clear message.

    A ``.pt``/``.pth``/``.ckpt``/``.bin`` file is a checkpoint of the official TransMIL, MHIM-MIL
    or CLAM code, read without unpickling code (``napari_mil.models.interop``); ``part`` picks an
    MHIM-MIL file's student or teacher, ``foreign_options`` its activations."""
    from safetensors.torch import load_file

    base = Path(path)
    if base.suffix in FOREIGN_SUFFIXES:
        from napari_mil.models.interop import ForeignCheckpointError, load_foreign_checkpoint

        try:
            model, meta = load_foreign_checkpoint(base, part, feature_dim, **foreign_options)
        except ForeignCheckpointError as exc:
            raise CheckpointError(str(exc)) from None
        return model.to(device), meta
    if base.suffix in (".json", ".safetensors"):
        base = base.with_suffix("")
    config, weights = base.with_suffix(".json"), base.with_suffix(".safetensors")
    if not config.exists() or not weights.exists():
        raise CheckpointError(f"checkpoint {base.name}: need both {config.name} and {weights.name}")
    try:
        meta = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config.name} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != "napari-mil-checkpoint-1":
        raise CheckpointError(f"{config.name} is not a napari-mil checkpoint")
    _check_meta(meta, config.name)
    if feature_dim is not None and feature_dim != meta["in_dim"]:
        raise CheckpointError(
            f"the checkpoint expects {meta['in_dim']}-d features ({meta.get('encoder', 'its encoder')}) "
            f"but these have {feature_dim}: extract features with the encoder it was trained on"
        )
    try:
        model = create_model(meta["model"], meta["in_dim"], meta["n_classes"], **meta.get("model_cfg", {}))
    except NapariMilError as exc:
        raise CheckpointError(f"{config.name}: {exc}") from None
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"cannot read {weights.name}: {exc}") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong or len(state) != len(own):
        raise CheckpointError(
            f"{weights.name} does not fit a {meta['model']} model: {len(missing)} missing, {len(wrong)} of another "
            f"shape, {len(set(state) - set(own))} unexpected tensors (another architecture?)"
        )
    model.load_state_dict(state)
    try:
        normaliser = FeatureNormaliser.from_meta(meta.get("normalisation"), feature_dim or meta["in_dim"])
    except NormalisationError as exc:
        raise CheckpointError(f"{config.name}: {exc}") from None
    if normaliser is not None:
        normaliser.attach(model)
    return model.to(device).eval(), meta


def _check_meta(meta: dict, name: str) -> None:
    """What a model is rebuilt from: present and of the right kind, else a CheckpointError."""
    missing = [key for key in ("model", "in_dim", "n_classes") if key not in meta]
    if missing:
        raise CheckpointError(f"{name} has no {', '.join(missing)}: the file is damaged or was not written whole; "
                              "use the checkpoint as training wrote it")
    for key in ("in_dim", "n_classes"):
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{name}: {key} must be a whole number of at least 1, not {value!r}")
    if not isinstance(meta["model"], str) or not isinstance(meta.get("model_cfg", {}), dict):
        raise CheckpointError(f"{name}: 'model' must be a model name and 'model_cfg' its options")


def load_for_prediction(checkpoint: str | Path, feature_dim: int | None = None, part: str = "student",
                        device: str = "cpu"):
    """(model, meta) of a checkpoint's student or teacher.

    A napari-mil checkpoint trained in MHIM-MIL mode keeps its teacher beside it
    (``<checkpoint>_teacher.json/.safetensors``). Asking for the teacher of a checkpoint that has
    none, or finding a teacher of another architecture than its student, is a CheckpointError;
    the student is never returned in its place. Other code's files pick their part themselves."""
    if part not in ("student", "teacher"):
        raise NapariMilError(f"part must be 'student' or 'teacher', not {part!r}")
    model, meta = load_checkpoint(checkpoint, feature_dim=feature_dim, device=device, part=part)
    if part == "student" or Path(checkpoint).suffix in FOREIGN_SUFFIXES or meta.get("role") == "teacher":
        return model, meta  # a teacher file named directly is the teacher
    name = _base(checkpoint).name
    if not meta.get("teacher"):
        raise CheckpointError(f"checkpoint {name} has no teacher: it was trained without MHIM-MIL (no --mhim). "
                              "Predict with its student (--part student), or train with --mhim to get a teacher")
    where = teacher_path(checkpoint)
    if not where.with_suffix(".json").exists() or not where.with_suffix(".safetensors").exists():
        raise CheckpointError(f"checkpoint {name} was trained with a teacher, but {where.name}.json and "
                              f"{where.name}.safetensors are not beside it: copy them with the student")
    try:
        teacher, teacher_meta = load_checkpoint(where, feature_dim=feature_dim, device=device)
    except CheckpointError as exc:
        raise CheckpointError(f"the teacher of {name}: {exc}") from None
    student_arch, teacher_arch = _architecture(meta), _architecture(teacher_meta)
    if student_arch != teacher_arch:
        raise CheckpointError(f"{where.name} is not the teacher of {name}: the teacher is a {_describe(teacher_arch)}, "
                              f"the student a {_describe(student_arch)}. The files were mixed up; train again or "
                              "put the run's own teacher files beside the student")
    return teacher, {**meta, **teacher_meta, "threshold": teacher_meta.get("threshold", 0.5)}


def _base(checkpoint: str | Path) -> Path:
    base = Path(checkpoint)
    return base.with_suffix("") if base.suffix in (".json", ".safetensors") else base


def _architecture(meta: dict) -> tuple:
    return meta["model"], json.dumps(meta.get("model_cfg", {}), sort_keys=True), meta["in_dim"], meta["n_classes"]


def _describe(arch: tuple) -> str:
    model, cfg, in_dim, n_classes = arch
    cfg = json.loads(cfg)
    options = f" ({', '.join(f'{k}={v}' for k, v in cfg.items())})" if cfg else ""
    return f"{model}{options} on {in_dim}-d features with {n_classes} classes"


def checkpoint_encoder(meta: dict, given: str | None = None) -> tuple[str, str | None]:
    """The encoder whose features a checkpoint reads: ``given`` when set, else the one its
    training recorded; checkpoints that record none (other code's files) get the default, with
    a note saying so (the second value)."""
    if given:
        return given, None
    if meta.get("encoder"):
        return str(meta["encoder"]), None
    return DEFAULT_ENCODER, (f"the checkpoint records no encoder: reading {DEFAULT_ENCODER} features; "
                             "give --encoder when it was trained on another")


def load_model_and_teacher(path: Path, part: str, feature_dim: int | None):
    """(model, meta, teacher or None): an MHIM-MIL run's teacher comes along when the file has one."""
    model, meta = load_checkpoint(path, feature_dim=feature_dim, part=part)
    if path.suffix in FOREIGN_SUFFIXES:
        teacher = None
        if part == "student":
            try:
                teacher, _ = load_checkpoint(path, feature_dim=feature_dim, part="teacher")
            except NapariMilError:  # plain training: no teacher in the file
                teacher = None
        return model, meta, teacher
    return model, meta, load_teacher(path, meta)
