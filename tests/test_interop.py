"""Checkpoints of the official TransMIL, MHIM-MIL and CLAM code load and give the same outputs.

Each test builds a module with the official layer layout (attribute names and layer order as in
those projects' model definitions), with a forward pass written here from the papers, saves its
state dict the way that project saves checkpoints, and checks that napari-mil's model built
from the file reproduces the logits and the attention. Nyström attention in the references is
the `nystrom-attention` package, the implementation the official TransMIL code imports.
"""

from __future__ import annotations

import math
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_mil.models.interop import ForeignCheckpointError, load_foreign_checkpoint, read_torch_checkpoint
from napari_mil.models.transmil import NystromAttention as OwnNystrom

nystrom_attention = pytest.importorskip("nystrom_attention")


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


# ---- Nyström attention against the reference implementation ------------------------------------
@pytest.mark.parametrize("n", [37, 300])
def test_nystrom_attention_matches_reference_package(n):
    ours = _randomise(OwnNystrom(64, heads=4, dim_head=16, landmarks=32, dropout=0.0), 0)
    ref = nystrom_attention.NystromAttention(dim=64, dim_head=16, heads=4, num_landmarks=32, pinv_iterations=6,
                                             residual=True, residual_conv_kernel=33).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, n, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x)[0], ref(x), atol=1e-5)


# ---- reference modules in the official layouts ----------------------------------------------------
class _Layer(nn.Module):  # TransLayer: norm, then Nyström attention, residual
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nystrom_attention.NystromAttention(dim=dim, dim_head=dim // 8, heads=8, num_landmarks=dim // 2,
                                                       pinv_iterations=6, residual=True)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class _PPEG(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj, self.proj1, self.proj2 = (nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, grid):
        return grid + self.proj(grid) + self.proj1(grid) + self.proj2(grid)


def _grid(tokens, side):
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


class OfficialTransMIL(nn.Module):
    """Layout of szc19990412/TransMIL: _fc1, pos_layer, cls_token, layer1, layer2, norm, _fc2."""

    def __init__(self, in_dim=48, dim=64, n_classes=3):
        super().__init__()
        self.pos_layer = _PPEG(dim)
        self._fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1, self.layer2 = _Layer(dim), _Layer(dim)
        self.norm = nn.LayerNorm(dim)
        self._fc2 = nn.Linear(dim, n_classes)

    def forward(self, x):
        h = self._fc1(x)
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[:, : side * side - n]], 1)  # squared with copies of the first instances
        h = self.layer1(torch.cat([self.cls_token, h], 1))
        h = torch.cat([h[:, :1], self.pos_layer(_grid(h[:, 1:], side)).flatten(2).transpose(1, 2)], 1)
        return self._fc2(self.norm(self.layer2(h))[:, 0])


class _SelfAttentionEncoder(nn.Module):  # MHIM-MIL's TransMIL-style aggregator
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1, self.layer2 = _Layer(dim), _Layer(dim)
        self.pos_embedding = _PPEG(dim)

    def forward(self, h):
        n = h.shape[1]
        h = self.layer1(torch.cat([self.cls_token, h], 1))
        tokens = h[:, 1:]
        side = math.ceil(math.sqrt(n))
        tokens = torch.cat([tokens, tokens[:, : side * side - n]], 1)
        if side < 7:  # zero-filled up to 7 x 7
            tokens = torch.cat([tokens, tokens.new_zeros(1, 49 - side * side, tokens.shape[2])], 1)
            side = 7
        encoded = self.pos_embedding(_grid(tokens, side)).flatten(2).transpose(1, 2)[:, :n]
        return self.norm(self.layer2(torch.cat([h[:, :1], encoded], 1)))[:, 0]


class _DAttention(nn.Module):  # MHIM-MIL's ABMIL aggregator: bias-free, ReLU
    def __init__(self, dim, gated):
        super().__init__()
        self.attention = nn.Module()
        if gated:
            self.attention.attention_a = nn.Sequential(nn.Linear(dim, 16, bias=False), nn.ReLU())
            self.attention.attention_b = nn.Sequential(nn.Linear(dim, 16, bias=False), nn.Sigmoid())
            self.attention.attention_c = nn.Linear(16, 1, bias=False)
        else:
            self.attention.attention = nn.Sequential(nn.Linear(dim, 16, bias=False), nn.ReLU(), nn.Linear(16, 1, bias=False))
        self.gated = gated

    def scores(self, h):
        a = self.attention
        if self.gated:
            return a.attention_c(a.attention_a(h) * a.attention_b(h))
        return a.attention(h)


class OfficialMHIM(nn.Module):
    """Layout of DearCaat/MHIM-MIL's MHIM: embedding, online_encoder, predictor."""

    def __init__(self, version="v1", baseline="attn", gated=False, in_dim=48, dim=64, n_classes=2):
        super().__init__()
        act = nn.ReLU() if version == "v1" else nn.GELU()
        setattr(self, "patch_to_emb" if version == "v1" else "feature", nn.Sequential(nn.Linear(in_dim, dim), act))
        self.embed_name = "patch_to_emb" if version == "v1" else "feature"
        self.online_encoder = _SelfAttentionEncoder(dim) if baseline == "selfattn" else _DAttention(dim, gated)
        self.predictor = nn.Linear(dim, n_classes)

    def forward(self, x):
        h = getattr(self, self.embed_name)(x)
        if isinstance(self.online_encoder, _SelfAttentionEncoder):
            return self.predictor(self.online_encoder(h)), None
        attention = torch.softmax(self.online_encoder.scores(h)[..., 0], dim=1)
        return self.predictor(torch.einsum("bn,bnd->bd", attention, h)), attention


class OfficialCLAMSB(nn.Module):
    """Layout of mahmoodlab/CLAM's CLAM_SB: attention_net, classifiers, instance_classifiers."""

    def __init__(self, gated=True, in_dim=48, n_classes=2):
        super().__init__()
        net = nn.Module()
        if gated:
            net.attention_a = nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Dropout(0.25))
            net.attention_b = nn.Sequential(nn.Linear(32, 24), nn.Sigmoid(), nn.Dropout(0.25))
            net.attention_c = nn.Linear(24, 1)
        else:
            net.module = nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Dropout(0.25), nn.Linear(24, 1))
        self.attention_net = nn.Sequential(nn.Linear(in_dim, 32), nn.ReLU(), nn.Dropout(0.25), net)
        self.classifiers = nn.Linear(32, n_classes)
        self.instance_classifiers = nn.ModuleList([nn.Linear(32, 2) for _ in range(n_classes)])
        self.gated = gated

    def forward(self, x):
        h = self.attention_net[:3](x)
        net = self.attention_net[3]
        scores = net.attention_c(net.attention_a(h) * net.attention_b(h)) if self.gated else net.module(h)
        attention = torch.softmax(scores[..., 0], dim=1)
        return self.classifiers(torch.einsum("bn,bnd->bd", attention, h)), attention


def _opaque_object():
    """An instance of a class from a module that will not exist when the checkpoint is read (as
    Lightning's hyper-parameters or training arguments of another project would)."""
    module = types.ModuleType("someone_elses_training_code")
    cls = type("Config", (dict,), {"__module__": "someone_elses_training_code"})
    module.Config = cls
    sys.modules[module.__name__] = module
    return cls(lr=2e-4, fold=0)


def _save(obj, path):
    torch.save(obj, path)
    sys.modules.pop("someone_elses_training_code", None)
    return path


# ---- the layouts load and reproduce the outputs -----------------------------------------------------
@pytest.mark.parametrize("n", [5, 50, 200])
def test_official_transmil_lightning_checkpoint(tmp_path, n):
    ref = _randomise(OfficialTransMIL(), 1)
    ckpt = _save({"state_dict": {f"model.{k}": v for k, v in ref.state_dict().items()},
                  "hyper_parameters": _opaque_object(), "epoch": 7}, tmp_path / "epoch=7-val_loss=0.3.ckpt")
    model, meta = load_foreign_checkpoint(ckpt, feature_dim=48)
    assert (meta["model"], meta["layout"], meta["n_classes"]) == ("transmil", "TransMIL (official)", 3)
    x = torch.randn(1, n, 48)
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(out.logits, ref(x), atol=1e-4)
    assert torch.allclose(out.attention.sum(1), torch.ones(1))


@pytest.mark.parametrize("version,baseline,gated", [("v1", "attn", False), ("v2", "attn", True),
                                                     ("v1", "selfattn", False), ("v2", "selfattn", False)])
def test_mhim_student_and_teacher(tmp_path, version, baseline, gated):
    student = _randomise(OfficialMHIM(version, baseline, gated), 2)
    teacher = _randomise(OfficialMHIM(version, baseline, gated), 3)
    ckpt = _save({"model": student.state_dict(), "teacher": teacher.state_dict(), "epoch": 40},
                 tmp_path / "fold_0_model_best.pt")
    x = torch.randn(1, 30, 48)
    for part, ref in (("student", student), ("teacher", teacher)):
        model, meta = load_foreign_checkpoint(ckpt, part=part)
        assert meta["layout"].startswith(f"MHIM-MIL {version}")
        with torch.no_grad():
            out = model(x)
            logits, attention = ref(x)
            assert torch.allclose(out.logits, logits, atol=1e-4), part
            if attention is not None:
                assert torch.allclose(out.attention, attention, atol=1e-5)
    # student and teacher really are different weights
    s, _ = load_foreign_checkpoint(ckpt, part="student")
    t, _ = load_foreign_checkpoint(ckpt, part="teacher")
    assert not torch.allclose(s(x).logits, t(x).logits)


def test_mhim_abmil_baseline_teacher_initialisation(tmp_path):
    ref = nn.Module()
    ref.feature = nn.Sequential(nn.Linear(48, 64), nn.ReLU())
    ref.attention = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 1))
    ref.classifier = nn.Sequential(nn.Linear(64, 2))
    _randomise(ref, 4)
    ckpt = _save({"model": ref.state_dict()}, tmp_path / "fold_0_model_best_auc.pt")
    model, meta = load_foreign_checkpoint(ckpt)
    assert meta["model"] == "abmil" and meta["model_cfg"]["attn_activation"] == "tanh"
    x = torch.randn(1, 20, 48)
    h = ref.feature(x)
    attention = torch.softmax(ref.attention(h)[..., 0], 1)
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(out.logits, ref.classifier(torch.einsum("bn,bnd->bd", attention, h)), atol=1e-5)
        assert torch.allclose(out.attention, attention, atol=1e-6)


@pytest.mark.parametrize("gated,data_parallel", [(True, False), (False, True)])
def test_clam_sb(tmp_path, gated, data_parallel):
    ref = _randomise(OfficialCLAMSB(gated), 5)
    state = {("module." if data_parallel else "") + k: v for k, v in ref.state_dict().items()}
    ckpt = _save(state, tmp_path / "s_0_checkpoint.pt")
    model, meta = load_foreign_checkpoint(ckpt, feature_dim=48)
    assert meta["model"] == ("abmil_gated" if gated else "abmil") and meta["layout"] == "CLAM-SB"
    x = torch.randn(1, 25, 48)
    with torch.no_grad():
        logits, attention = ref(x)
        out = model(x)
    assert torch.allclose(out.logits, logits, atol=1e-5)
    assert torch.allclose(out.attention, attention, atol=1e-6)


# ---- refusals ---------------------------------------------------------------------------------
def test_pickled_code_is_never_run(tmp_path):
    """A checkpoint whose unpickling would call a function: the call never happens. Functions of
    an importable module become inert placeholders; torch refuses blocked ones (os, ...) outright."""
    import os

    marker = tmp_path / "executed"
    module = types.ModuleType("someone_elses_hooks")
    module.side_effect = lambda path: open(path, "w").close()
    module.side_effect.__module__, module.side_effect.__qualname__ = "someone_elses_hooks", "side_effect"
    sys.modules["someone_elses_hooks"] = module  # importable while the file is read

    class Payload:
        def __reduce__(self):
            return (module.side_effect, (str(marker),))

    class SystemPayload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ref = _randomise(OfficialCLAMSB(), 6)
    ckpt = tmp_path / "s_0_checkpoint.pt"
    try:
        torch.save({"model": ref.state_dict(), "extra": Payload()}, ckpt)
        obj = read_torch_checkpoint(ckpt)
        assert isinstance(obj["extra"], dict) and not obj["extra"]  # an inert placeholder
        model, _ = load_foreign_checkpoint(ckpt)
        assert not marker.exists()
        assert torch.allclose(model(torch.ones(1, 3, 48)).logits, ref(torch.ones(1, 3, 48))[0], atol=1e-5)
    finally:
        sys.modules.pop("someone_elses_hooks", None)

    torch.save({"model": ref.state_dict(), "extra": SystemPayload()}, ckpt)
    with pytest.raises(ForeignCheckpointError, match="not a readable PyTorch checkpoint"):
        load_foreign_checkpoint(ckpt)
    assert not marker.exists()


def test_refusals(tmp_path):
    with pytest.raises(ForeignCheckpointError, match="does not exist"):
        load_foreign_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ForeignCheckpointError, match="not a readable PyTorch checkpoint"):
        load_foreign_checkpoint(tmp_path / "notes.pt")
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"model": 1}))
    with pytest.raises(ForeignCheckpointError):
        load_foreign_checkpoint(legacy)

    clam = _randomise(OfficialCLAMSB(), 7)
    ckpt = _save(clam.state_dict(), tmp_path / "clam.pt")
    with pytest.raises(ForeignCheckpointError, match="expects 48-d features but these have 1024"):
        load_foreign_checkpoint(ckpt, feature_dim=1024)
    with pytest.raises(ForeignCheckpointError, match="no teacher"):
        load_foreign_checkpoint(ckpt, part="teacher")

    multi = {**clam.state_dict(), "classifiers.0.weight": torch.zeros(1, 32)}
    multi.pop("classifiers.weight")
    with pytest.raises(ForeignCheckpointError, match="CLAM-MB"):
        load_foreign_checkpoint(_save(multi, tmp_path / "mb.pt"))

    extra = {**clam.state_dict(), "attention_net.0.norm.weight": torch.ones(32)}
    with pytest.raises(ForeignCheckpointError, match="no place in napari-mil's model"):
        load_foreign_checkpoint(_save(extra, tmp_path / "variant.pt"))

    with pytest.raises(ForeignCheckpointError, match="unrecognised checkpoint layout"):
        load_foreign_checkpoint(_save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt"))


def test_gelu_and_relu_options_reach_the_model(tmp_path):
    ref = _randomise(OfficialMHIM("v1", "attn"), 8)
    ckpt = _save({"model": ref.state_dict(), "teacher": None}, tmp_path / "m.pt")
    default, meta = load_foreign_checkpoint(ckpt)
    assert meta["model_cfg"]["embed_activation"] == "relu" and meta["model_cfg"]["attn_activation"] == "relu"
    other, meta = load_foreign_checkpoint(ckpt, embed_activation="gelu", attn_activation="tanh")
    x = torch.randn(1, 10, 48)
    assert not torch.allclose(default(x).logits, other(x).logits)
    assert F.softmax(default(x).logits, 1).shape == (1, 2)


def test_cli_predict_with_an_mhim_teacher_and_a_clam_checkpoint(tmp_path):
    """`napari-mil predict` takes the official files: per-patch attention equals the reference's."""
    import csv

    import h5py
    import numpy as np

    from napari_mil.cli import main
    from napari_mil.features.store import FeatureBag, feature_path

    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 48)).astype(np.float32)
    coords = np.stack(np.meshgrid(np.arange(8) * 256, np.arange(5) * 256), -1).reshape(-1, 2)
    FeatureBag(features, coords, {"encoder": "ext"}).save(feature_path(tmp_path / "run", "ext", "slide_a"))

    mhim = {"model": _randomise(OfficialMHIM("v1", "attn"), 9).state_dict()}
    teacher = _randomise(OfficialMHIM("v1", "attn"), 10)
    mhim["teacher"] = teacher.state_dict()
    clam = _randomise(OfficialCLAMSB(), 11)
    for name, ref, part in (("mhim.pt", teacher, "teacher"), ("clam.pth", clam, "student")):
        ckpt = _save(mhim if name == "mhim.pt" else clam.state_dict(), tmp_path / name)
        out = tmp_path / f"pred_{name}"
        assert main(["predict", "slide_a", "--checkpoint", str(ckpt), "--part", part, "--features",
                     str(tmp_path / "run"), "--encoder", "ext", "--out", str(out), "-q"]) == 0
        with torch.no_grad():
            logits, attention = ref(torch.from_numpy(features)[None])
        with open(out / "predictions.csv") as fh:
            row = next(csv.DictReader(fh))
        assert abs(float(row["probability"]) - torch.softmax(logits, 1)[0, 1].item()) < 1e-5
        with h5py.File(out / "attention" / "slide_a.h5") as fh:
            np.testing.assert_allclose(fh["attention"][:], attention[0].numpy(), atol=1e-6)
            np.testing.assert_array_equal(fh["coords"][:], coords)

    assert main(["predict", "slide_a", "--checkpoint", str(tmp_path / "clam.pth"), "--part", "teacher",
                 "--features", str(tmp_path / "run"), "--encoder", "ext", "--out", str(tmp_path / "x"), "-q"]) == 1
