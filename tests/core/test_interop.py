"""Checkpoints of the official TransMIL, MHIM-MIL and CLAM code load and give the same outputs.

Each test builds a module with the official layer layout (attribute names and layer order as in
those projects' model definitions), with a forward pass written here from the papers, saves its
state dict the way that project saves checkpoints, and checks that napari-mil's model built
from the file reproduces the logits and the attention.

Nyström attention in the references is written here too (``ReferenceNystrom``), from the
documented behaviour of the nystrom-attention package that the official TransMIL code imports,
in both of its versions' output slicings: 0.0.9 (pinned by the official TransMIL, so its
checkpoints depend on it) keeps the *first* n rows of the front-padded output, later versions
and MHIM-MIL's vendored copy the *last* n. The package itself is only needed by the optional
test that checks this reference against it.
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
from napari_mil.models.transmil import iterative_pinv


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the bags drawn in each test


def _randomise(module: nn.Module, seed: int, scale: float = 0.2) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


# ---- reference Nyström attention, both slicings ---------------------------------------------------
def reference_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Razavi et al.'s iteration V <- V/4 (13I - AV (15I - AV (7I - AV))) from V0 = A^T / (largest
    absolute row sum x largest absolute column sum), both taken over the whole tensor."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    v = a.transpose(-1, -2) / (a.abs().sum(-1).max() * a.abs().sum(-2).max())
    for _ in range(iterations):
        av = a @ v
        v = 0.25 * v @ (13 * eye - av @ (15 * eye - av @ (7 * eye - av)))
    return v


class ReferenceNystrom(nn.Module):
    """Nyström self-attention with the nystrom-attention package's parameter names (to_qkv without
    bias, to_out = Linear + Dropout, res_conv = depthwise (kernel x 1) convolution over the values
    of each head) and its computation: zeros padded at the front to a multiple of the landmarks;
    queries scaled by dim_head^-1/2; landmarks the means of consecutive groups of queries and keys;
    softmax(Q K_l^T) pinv(softmax(Q_l K_l^T)) softmax(Q_l K^T) V plus the residual convolution;
    then ``keep="first"`` keeps the first n output rows (0.0.9), ``keep="last"`` the last n (0.0.10
    and later). ``self.matrix`` keeps the last full (B, H, Np, Np) attention matrix."""

    def __init__(self, dim, heads, dim_head, landmarks, keep, kernel=33):
        super().__init__()
        assert keep in ("first", "last")
        self.heads, self.dim_head, self.landmarks, self.keep = heads, dim_head, landmarks, keep
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(0.0))
        self.res_conv = nn.Conv2d(heads, heads, (kernel, 1), padding=(kernel // 2, 0), groups=heads, bias=False)
        self.matrix = None

    def forward(self, x):
        b, n, dim = x.shape
        pad = -n % self.landmarks
        x = torch.cat([x.new_zeros(b, pad, dim), x], 1)  # (B, Np, dim)
        heads = lambda t: t.reshape(b, n + pad, self.heads, self.dim_head).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = (heads(t) for t in self.to_qkv(x).split(self.heads * self.dim_head, -1))
        q = q * self.dim_head**-0.5
        group = (n + pad) // self.landmarks
        q_l = q.unflatten(2, (self.landmarks, group)).sum(3) / group
        k_l = k.unflatten(2, (self.landmarks, group)).sum(3) / group
        s1, s2, s3 = (torch.softmax(a @ c.transpose(-1, -2), -1) for a, c in ((q, k_l), (q_l, k_l), (q_l, k)))
        self.matrix = (s1 @ reference_pinv(s2)) @ s3  # (B, H, Np, Np)
        out = self.matrix @ v + self.res_conv(v)
        out = self.to_out(out.permute(0, 2, 1, 3).reshape(b, n + pad, self.heads * self.dim_head))
        return out[:, :n] if self.keep == "first" else out[:, -n:]


def test_pseudo_inverse_matches_the_reference():
    a = torch.softmax(torch.randn(2, 4, 32, 32) * 3, -1)
    for i in range(2):  # napari-mil scales per bag, the package over the whole batch: same for one bag
        torch.testing.assert_close(iterative_pinv(a[i : i + 1]), reference_pinv(a[i : i + 1]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("keep", ["first", "last"])
@pytest.mark.parametrize("n", [32, 37, 53, 300])  # padding 0, 27, 11 (residual window reaches real rows), 20
def test_nystrom_attention_matches_the_reference(n, keep):
    """Outputs equal the reference's in both slicings; the attention row is the reference matrix's
    row whose output slot 0 receives (padded row `pad` for "last", 0 for "first"), over the real
    tokens; outputs computed for the first slots only equal those of the full pass."""
    ours = _randomise(OwnNystrom(64, heads=4, dim_head=16, landmarks=32, dropout=0.0, output_slice=keep), 0)
    ref = ReferenceNystrom(64, 4, 16, 32, keep)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, n, 64)
    pad = -n % 32
    with torch.no_grad():
        out, row = ours(x)
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(row, ref.matrix[:, :, pad if keep == "last" else 0, pad:], atol=1e-6, rtol=1e-4)
        first_slots, row_again = ours(x, keep=3)  # (attn1 pinv) first: other rounding
        torch.testing.assert_close(first_slots, out[:, :3], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(row_again, row, atol=1e-6, rtol=1e-4)
    if pad:  # the two slicings really differ here
        other = ReferenceNystrom(64, 4, 16, 32, "last" if keep == "first" else "first")
        other.load_state_dict(ours.state_dict())
        assert (other(x) - out).abs().max() > 1e-2


def test_reference_matches_the_nystrom_attention_package():
    """Optional: the reference above against the installed nystrom-attention package, in the
    slicing of its version (0.0.9: first rows; later: last rows)."""
    package = pytest.importorskip("nystrom_attention")
    from importlib.metadata import version

    keep = "first" if version("nystrom-attention") == "0.0.9" else "last"
    ref = _randomise(ReferenceNystrom(64, 4, 16, 32, keep), 0)
    theirs = package.NystromAttention(dim=64, dim_head=16, heads=4, num_landmarks=32, pinv_iterations=6,
                                      residual=True, residual_conv_kernel=33).eval()
    theirs.load_state_dict(ref.state_dict())
    ours = OwnNystrom(64, heads=4, dim_head=16, landmarks=32, dropout=0.0, output_slice=keep).eval()
    ours.load_state_dict(ref.state_dict())
    for n in (32, 37, 300):
        x = torch.randn(1, n, 64)
        with torch.no_grad():
            torch.testing.assert_close(ref(x), theirs(x), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(ours(x)[0], theirs(x), atol=1e-5, rtol=1e-4)


# ---- reference modules in the official layouts ----------------------------------------------------
class _Layer(nn.Module):  # TransLayer: norm, then Nyström attention (heads 8, landmarks dim / 2), residual
    def __init__(self, dim, keep):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = ReferenceNystrom(dim, 8, dim // 8, dim // 2, keep)

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
    """Layout of szc19990412/TransMIL: _fc1, pos_layer, cls_token, layer1, layer2, norm, _fc2;
    its Nyström attention is nystrom-attention 0.0.9's (``keep="first"``)."""

    def __init__(self, in_dim=48, dim=64, n_classes=3, keep="first"):
        super().__init__()
        self.pos_layer = _PPEG(dim)
        self._fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1, self.layer2 = _Layer(dim, keep), _Layer(dim, keep)
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
        self.layer1, self.layer2 = _Layer(dim, "last"), _Layer(dim, "last")  # MHIM-MIL's vendored copy: out[:, -n:]
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
def _fold(row: torch.Tensor, n: int) -> torch.Tensor:
    """A class-token attention row over 1 + side^2 tokens (class token first) -> per-instance
    weights: the appended copies added to the first instances, clipped at 0, summing to 1."""
    att = row[1 : n + 1].clone()
    att[: row.shape[0] - 1 - n] += row[n + 1 :]
    att = att.clamp_min(0)
    return att / att.sum()


@pytest.mark.parametrize("n", [5, 13, 20, 50, 200])  # front padding 22, 15, 6 (the residual window reaches real tokens), 31, 30
def test_official_transmil_lightning_checkpoint(tmp_path, n):
    """An official TransMIL checkpoint reproduces the official code's logits (nystrom-attention
    0.0.9's first-rows slicing) to 1e-5; the per-instance attention is the row whose output the
    class-token slot receives, padded row 0, over the real tokens in order."""
    ref = _randomise(OfficialTransMIL(), 1)
    ckpt = _save({"state_dict": {f"model.{k}": v for k, v in ref.state_dict().items()},
                  "hyper_parameters": _opaque_object(), "epoch": 7}, tmp_path / "epoch=7-val_loss=0.3.ckpt")
    model, meta = load_foreign_checkpoint(ckpt, feature_dim=48)
    assert (meta["model"], meta["layout"], meta["n_classes"]) == ("transmil", "TransMIL (official)", 3)
    assert meta["model_cfg"]["output_slice"] == "first"
    x = torch.randn(1, n, 48)
    with torch.no_grad():
        out = model(x)
        logits = ref(x)
        torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
        later = OfficialTransMIL(keep="last")  # the same weights under the later versions' slicing
        later.load_state_dict(ref.state_dict())
        assert (later.eval()(x) - logits).abs().max() > 1e-3  # the slicing matters for these weights
    assert torch.allclose(out.attention.sum(1), torch.ones(1))
    tokens = 1 + math.ceil(math.sqrt(n)) ** 2
    pad = -tokens % 32
    for layer, attn in ((0, ref.layer1.attn), (1, ref.layer2.attn)):  # their matrices from ref(x) above
        with torch.no_grad():
            attention = model(x, attention_layer=layer).attention[0]
        expected = _fold(attn.matrix[0, :, 0, pad:].mean(0), n)  # padded row 0, real tokens from column pad
        torch.testing.assert_close(attention, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_official_transmil_default_size():
    """The official size (1024-d features, 512-d, 8 heads, 256 landmarks) on a 600-instance bag
    (626 tokens, padded to 768): the official code's logits to 1e-5."""
    from napari_mil.models import create_model
    from napari_mil.models.interop import convert_state_dict

    ref = _randomise(OfficialTransMIL(in_dim=1024, dim=512, n_classes=2), 2, scale=0.05)
    name, cfg, state, _ = convert_state_dict(ref.state_dict())
    model = create_model(name, 1024, 2, **cfg).eval()
    model.load_state_dict(state)
    x = torch.randn(1, 600, 1024)
    with torch.no_grad():
        logits = ref(x)
        torch.testing.assert_close(model(x).logits, logits, atol=1e-5, rtol=0)
        model.layer1.attn.output_slice = model.layer2.attn.output_slice = "last"
        assert (model(x).logits - logits).abs().max() > 1e-3


def test_official_transmil_round_trips_through_a_napari_mil_checkpoint(tmp_path):
    """The slicing is part of the model's configuration: saved as a napari-mil checkpoint and read
    back, an official model still computes what the official code does."""
    from napari_mil.training.checkpoints import load_checkpoint, save_checkpoint

    ref = _randomise(OfficialTransMIL(), 3)
    model, meta = load_foreign_checkpoint(_save(ref.state_dict(), tmp_path / "transmil.pt"))
    save_checkpoint(tmp_path / "converted", model, {k: meta[k] for k in ("model", "model_cfg", "in_dim", "n_classes")})
    again, meta_again = load_checkpoint(tmp_path / "converted")
    assert meta_again["model_cfg"]["output_slice"] == "first" and again.layer2.attn.output_slice == "first"
    x = torch.randn(1, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, ref(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("version,baseline,gated", [("v1", "attn", False), ("v2", "attn", True),
                                                     ("v1", "selfattn", False), ("v2", "selfattn", False)])
def test_mhim_student_and_teacher(tmp_path, version, baseline, gated):
    student = _randomise(OfficialMHIM(version, baseline, gated), 2)
    teacher = _randomise(OfficialMHIM(version, baseline, gated), 3)
    ckpt = _save({"model": student.state_dict(), "teacher": teacher.state_dict(), "epoch": 40},
                 tmp_path / "fold_0_model_best.pt")
    for n in (30, 31, 100):  # with the class token: 31, 32 (no front padding), 101 tokens
        x = torch.randn(1, n, 48)
        for part, ref in (("student", student), ("teacher", teacher)):
            model, meta = load_foreign_checkpoint(ckpt, part=part)
            assert meta["layout"].startswith(f"MHIM-MIL {version}")
            if baseline == "selfattn":
                assert meta["model_cfg"]["output_slice"] == "last"  # MHIM-MIL's vendored Nyström: out[:, -n:]
            with torch.no_grad():
                out = model(x)
                logits, attention = ref(x)
                torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0, msg=part)
                if attention is not None:
                    assert torch.allclose(out.attention, attention, atol=1e-5)
    x = torch.randn(1, 30, 48)
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


def _clam_demo_state(gated: bool, seed: int) -> dict[str, torch.Tensor]:
    """A state dict in the key layout of CLAM's heatmap demo checkpoint
    (heatmaps/demo/ckpts/s_0_checkpoint.pt): CLAM-SB "small" (1024 -> 512, attention 256; with
    dropout, so the attention network is attention_net.3) whose attention_net was wrapped in
    DataParallel (``.module`` after its name), the instance classifiers, and the buffer of the
    instance loss (its smooth SVM's class labels, int64)."""
    gen = torch.Generator().manual_seed(seed)
    w = lambda *shape: torch.randn(*shape, generator=gen) * 0.05  # noqa: E731
    net = "attention_net.module."
    state = {f"{net}0.weight": w(512, 1024), f"{net}0.bias": w(512)}
    if gated:  # the demo's
        for branch in ("a", "b"):
            state[f"{net}3.attention_{branch}.0.weight"], state[f"{net}3.attention_{branch}.0.bias"] = w(256, 512), w(256)
        state[f"{net}3.attention_c.weight"], state[f"{net}3.attention_c.bias"] = w(1, 256), w(1)
    else:  # CLAM's plain attention network names its layers `module` itself
        state[f"{net}3.module.0.weight"], state[f"{net}3.module.0.bias"] = w(256, 512), w(256)
        state[f"{net}3.module.3.weight"], state[f"{net}3.module.3.bias"] = w(1, 256), w(1)
    state["classifiers.weight"], state["classifiers.bias"] = w(2, 512), w(2)
    for i in range(2):
        state[f"instance_classifiers.{i}.weight"], state[f"instance_classifiers.{i}.bias"] = w(2, 512), w(2)
    state["instance_loss_fn.labels"] = torch.arange(2)
    return state


def _clam_reference(state, x, gated):
    """CLAM-SB's forward from the weights: ReLU embedding, (gated) tanh attention, softmax over the
    instances, attention pooling, bag classifier."""
    p = lambda key: state["attention_net.module." + key]  # noqa: E731
    h = torch.relu(x @ p("0.weight").T + p("0.bias"))  # (1, N, 512)
    if gated:
        a = torch.tanh(h @ p("3.attention_a.0.weight").T + p("3.attention_a.0.bias"))
        b = torch.sigmoid(h @ p("3.attention_b.0.weight").T + p("3.attention_b.0.bias"))
        scores = (a * b) @ p("3.attention_c.weight").T + p("3.attention_c.bias")
    else:
        scores = torch.tanh(h @ p("3.module.0.weight").T + p("3.module.0.bias")) @ p("3.module.3.weight").T + p("3.module.3.bias")
    attention = torch.softmax(scores[..., 0], dim=1)  # (1, N)
    return (attention @ h)[:, 0] @ state["classifiers.weight"].T + state["classifiers.bias"], attention


@pytest.mark.parametrize("gated", [True, False])
def test_clam_heatmap_demo_checkpoint_layout(tmp_path, gated):
    """CLAM's demo checkpoint layout loads, as CLAM's loader takes it (the `.module` of DataParallel
    removed, the instance loss's entries dropped), and reproduces CLAM's logits and attention."""
    state = _clam_demo_state(gated, 13)
    ckpt = _save(state, tmp_path / "s_0_checkpoint.pt")
    model, meta = load_foreign_checkpoint(ckpt, feature_dim=1024)
    assert (meta["model"], meta["layout"]) == ("abmil_gated" if gated else "abmil", "CLAM-SB")
    assert (meta["model_cfg"]["embed_dim"], meta["model_cfg"]["attn_dim"], meta["n_classes"]) == (512, 256, 2)
    x = torch.randn(1, 300, 1024)
    with torch.no_grad():
        out = model(x)
    logits, attention = _clam_reference(state, x, gated)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.attention, attention, atol=1e-7, rtol=1e-4)


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
