"""Checkpoints trained with other code: official TransMIL, MHIM-MIL and CLAM.

Users of those projects can look at their own models' attention in napari-mil. A checkpoint is
read with ``torch.load(weights_only=True)``: only tensors and plain containers are rebuilt.
Other pickled objects in it (training arguments, Lightning hyper-parameters, paths) are never
imported or called; each becomes an empty inert placeholder, so a file that would run code on
unpickling loads as data or not at all.

Layouts recognised (key names read from each project's model definitions):

- **TransMIL** (szc19990412/TransMIL, also MHIM-MIL's TransMIL baseline): ``_fc1``,
  ``cls_token``, ``layer1``/``layer2`` (Nyström attention), ``pos_layer`` (PPEG), ``norm``,
  ``_fc2``; Lightning's ``state_dict`` with its ``model.`` prefix is unwrapped. The official
  code pins nystrom-attention 0.0.9, which keeps the *first* n rows of the front-padded
  attention output; its checkpoints are built with ``output_slice="first"`` to compute what
  they were trained to compute (see ``napari_mil.models.transmil``).
- **MHIM-MIL** (DearCaat/MHIM-MIL, ICCV 2023 release and MHIM-v2): ``{'model': student,
  'teacher': teacher}``; the embedding ``patch_to_emb`` (v1) or ``feature`` (v2), the
  aggregator ``online_encoder`` (ABMIL ``attention``, gated or not, bias-free; or TransMIL-style
  self-attention whose PPEG sits on the instance tokens, and whose vendored Nyström attention
  keeps the *last* n output rows, ``output_slice="last"``) and the ``predictor``.
- **ABMIL baselines** of the MHIM-MIL code (its teacher initialisations): ``feature``,
  ``attention`` (or gated ``attention_a/b/c``), ``classifier``.
- **CLAM-SB** (mahmoodlab/CLAM): ``attention_net`` (embedding, then the gated or plain
  attention network), ``classifiers``. The instance classifiers are used only for CLAM's
  training loss and are not needed for the slide prediction or the attention map; they are
  dropped, as are the buffers of the instance loss (``instance_loss_fn.*``, e.g. the labels of
  its smooth SVM loss). Older CLAM wrapped ``attention_net`` in DataParallel on multi-GPU
  machines, so its files (the heatmap demo's ``s_0_checkpoint.pt`` among them) name
  ``attention_net.module.0.weight``; that ``.module`` is removed, as CLAM's own loader does.
  CLAM-MB (one attention branch per class) is refused with a message.

Activations are not stored in a state dict. The defaults are each release's: ReLU embeddings
and ReLU attention for MHIM-MIL v1 and for the ``--da_act`` default of v2, GELU embeddings for
MHIM-MIL v2 (its feature config), tanh attention for CLAM and the baselines. Override them with
``embed_activation=`` and ``attn_activation=`` when a model was trained otherwise.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import torch

from napari_mil.errors import NapariMilError
from napari_mil.models import create_model


class ForeignCheckpointError(NapariMilError):
    """A third-party checkpoint that cannot be read or whose layout is not recognised."""


# ---- reading without unpickling arbitrary objects ---------------------------------------------
def _placeholder(name: str) -> type:
    """An inert stand-in for the pickled global ``name``: constructing it (whatever the
    arguments) gives an empty OrderedDict, which the weights-only unpickler may fill with data."""

    def new(cls, *args, **kwargs):
        return OrderedDict()

    return type(f"Placeholder[{name}]", (), {"__new__": new})


def read_torch_checkpoint(path: str | Path) -> object:
    """``torch.load(path, weights_only=True)`` with every non-allowlisted global replaced by an
    inert placeholder; raises ForeignCheckpointError for files torch cannot read."""
    path = Path(path)
    if not path.is_file():
        raise ForeignCheckpointError(f"checkpoint {path} does not exist")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001  not a zip-format torch file: torch.load below says what it is
        unsafe = []
    stand_ins = [(_placeholder(name), name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  torch raises many types for unreadable files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ForeignCheckpointError(f"{path.name} is not a readable PyTorch checkpoint: {first}") from None


def _tensors(obj) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    return None


def find_state_dict(obj, part: str = "student") -> tuple[dict[str, torch.Tensor], str]:
    """The model weights inside a loaded checkpoint, and where they were found.

    ``part`` picks MHIM-MIL's ``'model'`` (the student) or ``'teacher'``."""
    if part not in ("student", "teacher"):
        raise ValueError("part must be 'student' or 'teacher'")
    if part == "teacher":
        teacher = _tensors(obj.get("teacher")) if isinstance(obj, dict) else None
        if teacher is None:
            raise ForeignCheckpointError("the checkpoint has no teacher weights (an MHIM-MIL 'teacher' entry)")
        return teacher, "teacher"
    state = _tensors(obj)
    if state is not None:
        return state, "state dict"
    if not isinstance(obj, dict):
        raise ForeignCheckpointError("the checkpoint holds no state dict of tensors")
    for key in ("model", "state_dict", "model_state_dict", "net"):
        state = _tensors(obj.get(key))
        if state is not None:
            return state, key
    raise ForeignCheckpointError(
        f"no model weights found; the checkpoint's entries are {', '.join(map(str, list(obj)[:12]))}")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DataParallel's ``module.`` and Lightning's ``model.`` prefixes when every key has one,
    and the ``.module`` that DataParallel puts after the name of a wrapped submodule
    (``attention_net.module.0.weight``) when every key under that name has it."""
    for prefix in ("module.", "model.", "module."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    by_top: dict[str, list[str]] = {}
    for key in state:
        by_top.setdefault(key.split(".", 1)[0], []).append(key)
    # only where *every* key has it: a submodule that is itself named `module` (CLAM's plain
    # attention network: attention_net.3.module.0.weight) keeps its name
    wrapped = {top for top, keys in by_top.items() if all(k.startswith(f"{top}.module.") for k in keys)}
    return {(f"{top}.{key[len(top) + len('.module.'):]}" if (top := key.split(".", 1)[0]) in wrapped else key): value
            for key, value in state.items()}


# ---- layouts -----------------------------------------------------------------------------------
def _rename(state, rules: list[tuple[str, str]], drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Apply the first matching (regex, replacement) rule to each key; keys matching ``drop`` go.
    A key that no rule matches is an error: a layout we do not know is never half-loaded."""
    out, unknown = {}, []
    for key, value in state.items():
        if any(re.match(d, key) for d in drop):
            continue
        for pattern, repl in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ForeignCheckpointError(
            f"{len(unknown)} weights of this checkpoint have no place in napari-mil's model "
            f"(another variant of the architecture?): {', '.join(unknown[:6])}")
    return out


_NYSTROM = [(r"(layer[12])\.(norm\.(weight|bias)|attn\.(to_qkv\.weight|to_out\.0\.(weight|bias)|res_conv\.weight))", r"\g<0>")]


def _transmil_cfg(state, prefix: str, fc1: str, embed_activation: str, positional: str, output_slice: str) -> dict:
    """Dimensions from the weights; landmarks are not stored, and both releases use dim // 2.
    ``output_slice`` is the Nyström output rows the release kept: "first" for the official
    TransMIL (nystrom-attention 0.0.9), "last" for MHIM-MIL's vendored copy."""
    dim = state[fc1].shape[0]
    heads = state[f"{prefix}layer1.attn.res_conv.weight"].shape[0]
    dim_head = state[f"{prefix}layer1.attn.to_qkv.weight"].shape[0] // (3 * heads)
    return {"dim": dim, "heads": heads, "dim_head": dim_head, "landmarks": dim // 2, "dropout": 0.0,
            "embed_activation": embed_activation, "positional": positional, "output_slice": output_slice}


def _last_index(state, prefix: str) -> int:
    return max(int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k)))


def _attn_dim(state, attn: str, gated: bool) -> int:
    return state[f"{attn}attention_a.0.weight" if gated else f"{attn}attention.0.weight"].shape[0]


def _abmil_rules(attn: str, state) -> tuple[list[tuple[str, str]], bool]:
    """Rules for an ABMIL attention module at ``attn`` (plain ``attention.{0,last}`` or gated
    ``attention_a.0/attention_b.0/attention_c``); returns them and whether it is gated."""
    gated = f"{attn}attention_a.0.weight" in state
    if gated:
        rules = [(rf"{re.escape(attn)}attention_a\.0\.(weight|bias)", r"attn_v.\1"),
                 (rf"{re.escape(attn)}attention_b\.0\.(weight|bias)", r"attn_u.\1"),
                 (rf"{re.escape(attn)}attention_c\.(weight|bias)", r"attn_w.\1")]
    else:
        last = _last_index(state, f"{attn}attention.")
        rules = [(rf"{re.escape(attn)}attention\.0\.(weight|bias)", r"attn_v.\1"),
                 (rf"{re.escape(attn)}attention\.{last}\.(weight|bias)", r"attn_w.\1")]
    return rules, gated


def convert_state_dict(state: dict[str, torch.Tensor], embed_activation: str | None = None,
                       attn_activation: str | None = None) -> tuple[str, dict, dict, str]:
    """A foreign state dict -> (model name, model config, napari-mil state dict, layout name)."""
    state = _strip_prefixes(state)
    keys = set(state)
    if "_fc1.0.weight" in keys and "layer1.attn.to_qkv.weight" in keys:
        cfg = _transmil_cfg(state, "", "_fc1.0.weight", embed_activation or "relu", "transmil", "first")
        rules = [(r"_fc1\.0\.(weight|bias)", r"fc1.0.\1"), (r"_fc2\.(weight|bias)", r"fc2.\1"),
                 (r"cls_token", "cls_token"), (r"norm\.(weight|bias)", r"norm.\1"),
                 (r"pos_layer\.proj[12]?\.(weight|bias)", r"\g<0>"), *_NYSTROM]
        return "transmil", cfg, _rename(state, rules), "TransMIL (official)"

    embed = next((p for p in ("patch_to_emb.", "feature.") if f"{p}0.weight" in keys), None)
    if embed is not None and any(k.startswith("online_encoder.") for k in keys):
        version = "v1" if embed == "patch_to_emb." else "v2"
        embed_rule = (rf"{re.escape(embed)}0\.(weight|bias)", r"fc1.0.\1")
        if "online_encoder.layer1.attn.to_qkv.weight" in keys:  # TransMIL-style self-attention
            cfg = _transmil_cfg(state, "online_encoder.", f"{embed}0.weight",
                                embed_activation or ("relu" if version == "v1" else "gelu"), "mhim", "last")
            rules = [embed_rule, (r"predictor\.(weight|bias)", r"fc2.\1"),
                     (r"online_encoder\.cls_token", "cls_token"), (r"online_encoder\.norm\.(weight|bias)", r"norm.\1"),
                     (r"online_encoder\.pos_embedding\.(proj[12]?)\.(weight|bias)", r"pos_layer.\1.\2"),
                     *[(r"online_encoder\." + p, r) for p, r in _NYSTROM]]
            mapped = _rename(state, rules, drop=(r"merge\.",))
            mapped = {k.replace("online_encoder.", ""): v for k, v in mapped.items()}
            return "transmil", cfg, mapped, f"MHIM-MIL {version} TransMIL"
        if any(k.startswith("online_encoder.attention.") for k in keys):
            attn_rules, gated = _abmil_rules("online_encoder.attention.", state)
            cfg = {"embed_dim": state[f"{embed}0.weight"].shape[0], "attn_dim": _attn_dim(state, "online_encoder.attention.", gated),
                   "attn_bias": any(k.endswith("bias") and k.startswith("online_encoder.") for k in keys),
                   "embed_activation": embed_activation or ("relu" if version == "v1" else "gelu"),
                   "attn_activation": attn_activation or "relu"}
            rules = [(rf"{re.escape(embed)}0\.(weight|bias)", r"embed.0.\1"),
                     (r"predictor\.(weight|bias)", r"classifier.\1"), *attn_rules]
            name = "abmil_gated" if gated else "abmil"
            return name, cfg, _rename(state, rules, drop=(r"merge\.",)), f"MHIM-MIL {version} ABMIL"
        raise ForeignCheckpointError("this MHIM-MIL checkpoint's aggregator (DSMIL?) is not one napari-mil offers")

    if "feature.0.weight" in keys and any(k.startswith(("attention.", "attention_a.")) for k in keys):
        attn_rules, gated = _abmil_rules("", state)
        cfg = {"embed_dim": state["feature.0.weight"].shape[0], "attn_dim": _attn_dim(state, "", gated),
               "attn_bias": "attention_c.bias" in keys or "attention.0.bias" in keys,
               "embed_activation": embed_activation or "relu", "attn_activation": attn_activation or "tanh"}
        rules = [(r"feature\.0\.(weight|bias)", r"embed.0.\1"), (r"classifier(\.0)?\.(weight|bias)", r"classifier.\2"),
                 *attn_rules]
        return ("abmil_gated" if gated else "abmil"), cfg, _rename(state, rules), "ABMIL (MHIM-MIL baseline)"

    if "attention_net.0.weight" in keys:
        if "classifiers.0.weight" in keys:
            raise ForeignCheckpointError("this is a CLAM-MB checkpoint (one attention branch per class); "
                                         "napari-mil reads CLAM-SB")
        net = _last_index(state, "attention_net.")
        attn = f"attention_net.{net}."
        gated = f"{attn}attention_a.0.weight" in keys
        if gated:
            attn_rules = _abmil_rules(attn, state)[0]
        else:
            last = _last_index(state, f"{attn}module.")
            attn_rules = [(rf"{re.escape(attn)}module\.0\.(weight|bias)", r"attn_v.\1"),
                          (rf"{re.escape(attn)}module\.{last}\.(weight|bias)", r"attn_w.\1")]
        attn_dim = state[f"{attn}attention_a.0.weight" if gated else f"{attn}module.0.weight"].shape[0]
        cfg = {"embed_dim": state["attention_net.0.weight"].shape[0], "attn_dim": attn_dim, "attn_bias": True,
               "embed_activation": embed_activation or "relu", "attn_activation": attn_activation or "tanh"}
        rules = [(r"attention_net\.0\.(weight|bias)", r"embed.0.\1"), (r"classifiers\.(weight|bias)", r"classifier.\1"),
                 *attn_rules]
        mapped = _rename(state, rules, drop=(r"instance_classifiers\.", r"instance_loss_fn\."))
        return ("abmil_gated" if gated else "abmil"), cfg, mapped, "CLAM-SB"

    sample = ", ".join(sorted(keys)[:6])
    raise ForeignCheckpointError(f"unrecognised checkpoint layout (keys such as {sample}); napari-mil reads "
                                 "official TransMIL, MHIM-MIL and CLAM-SB checkpoints and its own")


def load_foreign_checkpoint(path: str | Path, part: str = "student", feature_dim: int | None = None,
                            embed_activation: str | None = None, attn_activation: str | None = None):
    """Build the napari-mil model equivalent to a TransMIL, MHIM-MIL or CLAM checkpoint.

    Returns the model (eval mode, CPU) and metadata in the shape of napari-mil's checkpoint JSON
    (``model``, ``model_cfg``, ``in_dim``, ``n_classes``) plus ``source`` and ``layout``."""
    state, where = find_state_dict(read_torch_checkpoint(path), part)
    name, cfg, mapped, layout = convert_state_dict(state, embed_activation, attn_activation)
    first = mapped["fc1.0.weight" if name == "transmil" else "embed.0.weight"]
    last = mapped["fc2.weight" if name == "transmil" else "classifier.weight"]
    in_dim, n_classes = int(first.shape[1]), int(last.shape[0])
    if feature_dim is not None and feature_dim != in_dim:
        raise ForeignCheckpointError(f"{Path(path).name} expects {in_dim}-d features but these have {feature_dim}: "
                                     "extract features with the encoder the model was trained on")
    model = create_model(name, in_dim, n_classes, **cfg)
    own = model.state_dict()
    wrong = [k for k in own if k in mapped and tuple(mapped[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in mapped]
    if wrong or missing:
        raise ForeignCheckpointError(f"{Path(path).name} ({layout}) does not fit: missing {missing[:4]}, "
                                     f"other shapes {wrong[:4]}")
    model.load_state_dict({k: v.float() for k, v in mapped.items()})
    meta = {"model": name, "model_cfg": cfg, "in_dim": in_dim, "n_classes": n_classes, "layout": layout,
            "source": f"{Path(path).name} ({where})"}
    return model.eval(), meta
