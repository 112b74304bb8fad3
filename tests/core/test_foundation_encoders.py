"""Foundation-model encoders: registration, missing packages, hub failures, local weights.

The real-timm tests build tiny ViTs of the same kwargs family as the big models; they skip where
timm is not importable. The rest run everywhere, with stand-in timm/transformers modules."""

import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from napari_mil.encoders import foundation
from napari_mil.encoders.base import file_hash
from napari_mil.encoders.registry import create_encoder, list_encoders
from napari_mil.encoders.transforms import BatchTransform
from napari_mil.errors import EncoderError

DIMS = {"uni_v1": 1024, "uni_v2": 1536, "conch_v15": 768, "virchow2": 2560, "hoptimus0": 1536,
        "hoptimus1": 1536, "phikon_v2": 1024, "gigapath": 1536}
TIMM_ENCODERS = sorted(set(DIMS) - {"phikon_v2"})
CPU = torch.device("cpu")


def test_all_foundation_encoders_are_listed_with_their_dims():
    specs = {spec.name: spec for spec in list_encoders()}
    for name, dim in DIMS.items():
        assert name in specs
        assert specs[name].dim == dim
        assert "HuggingFace hub" in specs[name].needs


def test_importing_the_module_needs_no_heavy_package():
    code = ("import sys\n"
            "for m in ('timm', 'transformers', 'huggingface_hub'): sys.modules[m] = None\n"
            "import napari_mil.encoders.foundation\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", TIMM_ENCODERS)
def test_without_timm_the_error_says_what_to_install(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(EncoderError, match=r"pip install 'timm>=1\.0'"):
        create_encoder(name, device="cpu")


def test_without_transformers_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(EncoderError, match="pip install 'transformers'"):
        create_encoder("phikon_v2", device="cpu")


# --- hub failures ---------------------------------------------------------------------------------

class FakeHTTPError(Exception):
    def __init__(self, status: int):
        super().__init__(f"{status} Client Error for url: https://huggingface.co/api/models/x")
        self.response = types.SimpleNamespace(status_code=status)


class GatedRepoError(Exception):  # named like huggingface_hub's class
    pass


def _fake_timm(create_model):
    return types.SimpleNamespace(create_model=create_model, __version__="1.0.0")


def test_hub_401_from_timm_says_accept_terms_and_log_in(monkeypatch):
    def create_model(name, pretrained=False, **kwargs):
        raise FakeHTTPError(401)

    monkeypatch.setitem(sys.modules, "timm", _fake_timm(create_model))
    with pytest.raises(EncoderError) as info:
        create_encoder("uni_v1", device="cpu")
    message = str(info.value)
    for part in ("https://huggingface.co/MahmoodLab/uni", "huggingface-cli login", "HF_TOKEN", "--weights"):
        assert part in message


def test_hub_connection_error_says_hub_unreachable_and_use_weights(monkeypatch):
    def from_pretrained(hub_id, **kwargs):
        raise ConnectionError("HTTPSConnectionPool(host='huggingface.co', port=443): Max retries exceeded")

    fake = types.SimpleNamespace(AutoModel=types.SimpleNamespace(from_pretrained=from_pretrained))
    monkeypatch.setitem(sys.modules, "transformers", fake)
    with pytest.raises(EncoderError, match=r"unreachable.*owkin/phikon-v2.*--weights PATH \(weights=PATH"):
        create_encoder("phikon_v2", device="cpu")


def _raise_from(cause, outer):
    try:
        raise cause
    except Exception as exc:
        raise outer from exc


@pytest.mark.parametrize("error, kind", [
    (FakeHTTPError(403), "refused"),
    (GatedRepoError("Access to model x/y is restricted."), "refused"),
    (OSError("You are trying to access a gated repo.\nMake sure to have access to it."), "refused"),
    (TimeoutError("read timed out"), "unreachable"),
    (OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
             "in the cached files."), "unreachable"),
    (ValueError("something else"), "failed"),
])
def test_hub_failures_are_classified(error, kind):
    with pytest.raises(EncoderError, match=kind):
        foundation._from_hub("enc", "org/model", lambda: (_ for _ in ()).throw(error))


def test_hub_failure_is_found_along_the_exception_chain():
    def load():
        _raise_from(ConnectionError("no route"), RuntimeError("timm could not load the checkpoint"))

    with pytest.raises(EncoderError, match="unreachable"):
        foundation._from_hub("enc", "org/model", load)


# --- local weights through the timm path, with a stand-in timm -------------------------------------

class TinyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.head = nn.Linear(8, 6)

    def forward(self, x):  # (B, 3, S, S)
        return self.head(self.conv(x).mean(dim=(2, 3)))  # (B, 6)


def test_local_weights_are_loaded_and_used(monkeypatch, tmp_path):
    calls = []

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        return TinyBackbone()

    monkeypatch.setitem(sys.modules, "timm", _fake_timm(create_model))
    torch.manual_seed(0)
    reference = TinyBackbone().eval()
    path = tmp_path / "tiny.pth"
    torch.save(reference.state_dict(), path)
    transform = BatchTransform(32, 32)

    encoder = foundation._timm_encoder("tiny", "org/tiny", "tiny_arch", {"img_size": 32}, 6, transform,
                                       torch.float32, path, CPU)
    assert calls == [("tiny_arch", False, {"img_size": 32})]
    assert encoder.weights_hash == file_hash(path) and encoder.input_size == 32
    batch = torch.randint(0, 256, (3, 40, 40, 3), dtype=torch.uint8)
    with torch.inference_mode():
        expected = reference(transform(batch))  # (3, 6)
    torch.testing.assert_close(encoder(batch), expected)


def test_hub_path_asks_timm_for_pretrained_hub_weights(monkeypatch):
    calls = []

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        return TinyBackbone()

    monkeypatch.setitem(sys.modules, "timm", _fake_timm(create_model))
    encoder = foundation._timm_encoder("tiny", "org/tiny", "tiny_arch", {}, 6, BatchTransform(32, 32),
                                       torch.float32, None, CPU)
    assert calls == [("hf-hub:org/tiny", True)]
    assert encoder.weights_hash == "hub:org/tiny"


def test_weights_that_do_not_fit_name_the_keys(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", _fake_timm(lambda name, pretrained=False, **kw: TinyBackbone()))
    state = {k.replace("head.", "fc."): v for k, v in TinyBackbone().state_dict().items()}
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(EncoderError, match=r"does not fit tiny: 2 missing \(e\.g\. head\.weight"):
        foundation._timm_encoder("tiny", "org/tiny", "tiny_arch", {}, 6, BatchTransform(32, 32), torch.float32,
                                 path, CPU)


# --- output rules and CONCH parts, pure torch ---------------------------------------------------------

def test_class_and_mean_patch_tokens_skips_the_registers():
    class Tokens(nn.Module):
        num_prefix_tokens = 5  # class + 4 registers

        def forward(self, x):
            return x

    tokens = torch.randn(2, 5 + 9, 4)  # (B, prefix + N, D)
    out = foundation._modules().ClassAndMeanPatchTokens(Tokens())(tokens)
    assert out.shape == (2, 8)
    torch.testing.assert_close(out, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1))


def test_attentional_pooler_matches_the_attention_formula():
    torch.manual_seed(0)
    pooler = foundation._modules().AttentionalPooler(dim=16, context_dim=12, heads=4).eval()
    tokens = torch.randn(3, 7, 12)  # (B, N, C)
    q = pooler.to_q(pooler.ln_q(pooler.query)).view(1, 4, 4).transpose(0, 1)  # (H, Q, d)
    k, v = pooler.to_kv(pooler.ln_k(tokens)).chunk(2, dim=-1)  # (B, N, D) each
    k, v = (t.view(3, 7, 4, 4).transpose(1, 2) for t in (k, v))  # (B, H, N, d)
    attention = (q * 4 ** -0.5 @ k.transpose(-1, -2)).softmax(dim=-1)  # (B, H, Q, N)
    expected = pooler.to_out((attention @ v).transpose(1, 2).reshape(3, 1, 16))  # (B, Q, D)
    torch.testing.assert_close(pooler(tokens), expected)


def test_conch_position_table_is_resized_to_the_input_grid():
    table = torch.randn(1, 1 + 14 * 14, 8)
    assert foundation._conch_pos_embed(table, 14) is table
    resized = foundation._conch_pos_embed(table, 28)
    assert resized.shape == (1, 1 + 28 * 28, 8)
    torch.testing.assert_close(resized[:, 0], table[:, 0])
    constant = foundation._conch_pos_embed(torch.ones(1, 1 + 4, 3), 6)
    torch.testing.assert_close(constant, torch.ones(1, 1 + 36, 3))


# --- real timm: tiny models of the same kwargs families ----------------------------------------------

def _save(model, path):
    torch.save(model.state_dict(), path)
    return path


def test_timm_tiny_vit_with_registers_class_and_mean_output(tmp_path):
    timm = pytest.importorskip("timm")
    kwargs = dict(img_size=64, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
                  dynamic_img_size=True, mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    path = _save(reference, tmp_path / "virchow_like.pth")
    transform = BatchTransform(64, 64, interpolation="bicubic")

    encoder = foundation._timm_encoder("tiny", "org/tiny", "vit_tiny_patch16_224", kwargs, 384, transform,
                                       torch.float32, path, CPU, output="class_and_mean_patches")
    batch = torch.randint(0, 256, (3, 80, 80, 3), dtype=torch.uint8)
    with torch.inference_mode():
        tokens = reference(transform(batch))  # (3, 5 + 16, 192)
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)  # (3, 384)
    out = encoder(batch)
    assert out.shape == (3, 384)
    torch.testing.assert_close(out, expected)


def test_timm_tiny_vit_pooled_output(tmp_path):
    timm = pytest.importorskip("timm")
    kwargs = dict(img_size=64, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    path = _save(reference, tmp_path / "uni_like.pth")
    transform = BatchTransform(64, 64)
    encoder = foundation._timm_encoder("tiny", "org/tiny", "vit_tiny_patch16_224", kwargs, 192, transform,
                                       torch.float32, path, CPU)
    batch = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        expected = reference(transform(batch))  # (2, 192)
    assert encoder(batch).shape == (2, 192)
    torch.testing.assert_close(encoder(batch), expected)


def test_timm_weights_of_another_family_are_refused(tmp_path):
    timm = pytest.importorskip("timm")
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0)
    path = _save(plain, tmp_path / "plain.pth")
    kwargs = dict(img_size=64, init_values=1e-5, num_classes=0, reg_tokens=4)
    with pytest.raises(EncoderError, match="does not fit tiny"):
        foundation._timm_encoder("tiny", "org/tiny", "vit_tiny_patch16_224", kwargs, 192, BatchTransform(64, 64),
                                 torch.float32, path, CPU)


def test_timm_tiny_conch_tower_loads_and_resamples_the_position_table(tmp_path):
    timm = pytest.importorskip("timm")
    shape = dict(arch="vit_tiny_patch16_224", img_size=64, dim=48, heads=4, stored_grid=2)
    torch.manual_seed(0)
    reference = foundation._conch_v15_model(timm, **shape).eval()
    nn.init.normal_(reference.trunk.pos_embed)
    path = _save(reference, tmp_path / "conch_like.pth")

    fresh = foundation._conch_v15_model(timm, **shape)
    foundation._load_conch_v15(fresh, path, "tiny", timm)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        out = fresh.eval()(x)
        assert out.shape == (2, 48)
        torch.testing.assert_close(out, reference(x))

    state = reference.state_dict()
    state["trunk.pos_embed"] = torch.randn(1, 1 + 3 * 3, 192)  # a checkpoint stored at another grid
    torch.save(state, tmp_path / "grid3.pth")
    foundation._load_conch_v15(fresh, tmp_path / "grid3.pth", "tiny", timm)
    assert fresh.trunk.pos_embed.shape == (1, 1 + 2 * 2, 192)

    del state["ln_contrast.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(EncoderError, match="1 missing .*ln_contrast.weight"):
        foundation._load_conch_v15(fresh, tmp_path / "broken.pth", "tiny", timm)
