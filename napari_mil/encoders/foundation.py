"""Pathology foundation models as patch encoders: UNI, UNI2-h, CONCH v1.5, Virchow2, H-optimus-0/1,
Phikon-v2 and Prov-GigaPath.

Each loads from a local weights file (``weights=``, the state dict the model's HuggingFace repo
ships) or from the HuggingFace hub, where these repos are gated: accept the terms on the model's
page, then ``huggingface-cli login`` or set HF_TOKEN. timm, transformers and huggingface_hub are
imported only when a builder runs. Architecture arguments, eval transforms, precisions and output
rules follow the models' official cards and repositories (TRIDENT's settings where a card is silent).
"""

from __future__ import annotations

import functools
import importlib
import re
from pathlib import Path
from types import SimpleNamespace

from napari_mil.encoders.base import Encoder, file_hash, register_encoder
from napari_mil.encoders.transforms import BatchTransform
from napari_mil.errors import EncoderError

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
CONCH_V15_HUB = "MahmoodLab/conchv1_5"
CONCH_V15_FILE = "pytorch_model_vision.bin"


def _require(module: str, pip_spec: str, encoder: str):
    """Import ``module`` or raise an EncoderError saying what to pip install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EncoderError(f"{encoder} needs {module}: pip install '{pip_spec}'") from None
    except Exception as exc:  # installed but broken, e.g. a torchvision built for another torch
        raise EncoderError(f"{encoder}: {module} is installed but fails to import ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); reinstall it to match your torch: "
                           f"pip install -U '{pip_spec}'") from None


# --- hub failures -> what to do ------------------------------------------------------------------

_AUTH_TYPES = {"GatedRepoError", "RepositoryNotFoundError"}
_OFFLINE_TYPES = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectError",
                  "ConnectTimeout", "Timeout", "TimeoutError", "TimeoutException", "NameResolutionError"}
_AUTH_TEXT = re.compile(r"\b(401|403)\b|gated repo|unauthori[sz]ed|forbidden|is restricted|awaiting a review|"
                        r"authorized list|private or gated|invalid (user )?token", re.I)
_OFFLINE_TEXT = re.compile(r"connection|connect to|offline|timed? ?out|name resolution|max retries|"
                           r"network is unreachable|temporary failure|in the (local|disk) cache|cached files", re.I)


def _exception_chain(exc: BaseException, depth: int = 6) -> list[BaseException]:
    chain = []
    while exc is not None and len(chain) < depth and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _hub_failure(exc: Exception, encoder: str, hub_id: str) -> EncoderError:
    """The EncoderError for a failed hub load: refused access, no connection, or anything else.

    huggingface_hub's error classes are matched by name along the exception chain (timm and
    transformers re-raise them wrapped), then HTTP status codes, then the messages."""
    chain = _exception_chain(exc)
    type_names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    statuses = {getattr(getattr(e, "response", None), "status_code", None) for e in chain}
    text = " | ".join(f"{type(e).__name__}: {e}" for e in chain)
    lines = str(exc).strip().splitlines()
    brief = f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__
    if type_names & _AUTH_TYPES or statuses & {401, 403} or _AUTH_TEXT.search(text):
        return EncoderError(
            f"{encoder}: the HuggingFace hub refused access to {hub_id} ({brief}). Accept the model's terms "
            f"on https://huggingface.co/{hub_id}, then run `huggingface-cli login` or set HF_TOKEN; "
            "or pass a local weights file with --weights PATH")
    if type_names & _OFFLINE_TYPES or _OFFLINE_TEXT.search(text):
        return EncoderError(
            f"{encoder}: the HuggingFace hub is unreachable and {hub_id} is not in the local cache ({brief}). "
            f"Download the weights from https://huggingface.co/{hub_id} on a connected machine and point at "
            "the file with --weights PATH (weights=PATH in Python)")
    return EncoderError(f"{encoder}: loading {hub_id} from the HuggingFace hub failed ({brief})")


def _from_hub(encoder: str, hub_id: str, load):
    """``load()`` with hub failures turned into EncoderErrors that say what to do."""
    try:
        return load()
    except EncoderError:
        raise
    except Exception as exc:
        raise _hub_failure(exc, encoder, hub_id) from exc


# --- torch modules (defined on first use: importing this file imports no torch) ---------------------

@functools.cache
def _modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ClassAndMeanPatchTokens(nn.Module):
        """Virchow's embedding: the class token next to the mean patch token (registers skipped)."""

        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def forward(self, x):
            tokens = self.vit(x)  # (B, prefix + N, D): class, registers, patches
            patches = tokens[:, self.vit.num_prefix_tokens:]  # (B, N, D)
            return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)  # (B, 2D)

    class HiddenStateClassToken(nn.Module):
        """A transformers vision model's last-layer class token."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(pixel_values=x).last_hidden_state[:, 0]  # (B, D)

    class AttentionalPooler(nn.Module):
        """CoCa-style pooling: learned queries attend over the (layer-normed) tokens."""

        def __init__(self, dim: int, context_dim: int, heads: int, queries: int = 1):
            super().__init__()
            self.heads = heads
            self.query = nn.Parameter(torch.randn(queries, dim))
            self.ln_q = nn.LayerNorm(dim)
            self.ln_k = nn.LayerNorm(context_dim)
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
            self.to_out = nn.Linear(dim, dim, bias=False)

        def forward(self, tokens):  # (B, N, C)
            q = self.to_q(self.ln_q(self.query)).expand(tokens.shape[0], -1, -1)  # (B, Q, D)
            k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)  # (B, N, D) each
            q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D/H)
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Q, D/H)
            return self.to_out(out.transpose(1, 2).flatten(2))  # (B, Q, D)

    class ConchV15Vision(nn.Module):
        """CONCH v1.5's image tower: ViT trunk, attentional pooling, LayerNorm.

        The trunk keeps the checkpoint's position table for a ``stored_grid`` x ``stored_grid``
        patch grid and resizes it to the input's grid at run time, as the official code does."""

        def __init__(self, trunk, dim: int = 768, heads: int = 8, stored_grid: int = 14):
            super().__init__()
            self.trunk = trunk
            trunk.pos_embed = nn.Parameter(torch.zeros(1, 1 + stored_grid**2, trunk.embed_dim))
            self.attn_pool_contrast = AttentionalPooler(dim, trunk.embed_dim, heads)
            self.ln_contrast = nn.LayerNorm(dim)

        def forward(self, x):  # (B, 3, S, S)
            trunk = self.trunk
            patches = trunk.patch_embed(x)  # (B, N, C)
            grid = x.shape[-2] // trunk.patch_embed.patch_size[0]
            cls = trunk.cls_token.expand(patches.shape[0], -1, -1)  # (B, 1, C)
            tokens = torch.cat([cls, patches], dim=1) + _conch_pos_embed(trunk.pos_embed, grid)  # (B, 1 + N, C)
            tokens = trunk.norm(trunk.blocks(tokens))  # (B, 1 + N, C)
            return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])  # (B, dim)

    return SimpleNamespace(ClassAndMeanPatchTokens=ClassAndMeanPatchTokens, HiddenStateClassToken=HiddenStateClassToken,
                           AttentionalPooler=AttentionalPooler, ConchV15Vision=ConchV15Vision)


def _conch_pos_embed(pos_embed, grid: int):
    """The (1, 1 + g0², C) position table for a ``grid`` x ``grid`` input: the patch part resized
    bicubically by the factor (grid + 0.1) / g0 (DINO's rule, used by CONCH v1.5)."""
    import torch
    import torch.nn.functional as F

    stored = round((pos_embed.shape[1] - 1) ** 0.5)
    if stored == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, stored, stored, dim).permute(0, 3, 1, 2)  # (1, C, g0, g0)
    factor = (grid + 0.1) / stored
    patch = F.interpolate(patch, scale_factor=(factor, factor), mode="bicubic")  # (1, C, grid, grid)
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


# --- shared builders -----------------------------------------------------------------------------

def _encoder(name, model, transform, precision, dim, digest, device, description) -> Encoder:
    return Encoder(name, model.to(device).eval(), transform, precision, dim, transform.crop, digest, device,
                   description)


def _timm_encoder(name: str, hub_id: str, arch: str, timm_kwargs: dict, dim: int, transform: BatchTransform,
                  precision, weights, device, output: str = "pooled", description: str = "") -> Encoder:
    """A timm model: architecture ``arch`` with ``timm_kwargs`` filled from a local state dict
    (``weights``), else ``hf-hub:{hub_id}`` with the same kwargs. ``output`` is "pooled" (the model
    returns (B, dim)) or "class_and_mean_patches" (Virchow's rule on the returned tokens)."""
    timm = _require("timm", "timm>=1.0", name)
    if weights is not None:
        from napari_mil.encoders.custom import load_state_dict_checked

        try:
            model = timm.create_model(arch, pretrained=False, **timm_kwargs)
        except TypeError as exc:  # an old timm without e.g. reg_tokens or SwiGLUPacked
            raise EncoderError(f"{name}: timm {getattr(timm, '__version__', '?')} cannot build {arch} ({exc}); "
                               "pip install -U 'timm>=1.0'") from None
        load_state_dict_checked(model, weights, name)
        digest = file_hash(weights)
    else:
        model = _from_hub(name, hub_id, lambda: timm.create_model(f"hf-hub:{hub_id}", pretrained=True, **timm_kwargs))
        digest = f"hub:{hub_id}"
    if output == "class_and_mean_patches":
        model = _modules().ClassAndMeanPatchTokens(model)
    elif output != "pooled":
        raise ValueError(f"unknown output rule {output!r}")
    return _encoder(name, model, transform, precision, dim, digest, device, description)


def _swiglu(timm) -> dict:
    import torch

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


# --- the models ------------------------------------------------------------------------------------

def _needs(package: str, hub_id: str) -> str:
    return f"{package} and access to {hub_id} on the HuggingFace hub, or its weights file via --weights"


@register_encoder("uni_v1", dim=1024, description="UNI (Mahmood Lab), ViT-L/16, 224 px",
                  needs=_needs("timm>=1.0", "MahmoodLab/uni"))
def build_uni_v1(weights=None, device=None) -> Encoder:
    import torch

    kwargs = dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)
    return _timm_encoder("uni_v1", "MahmoodLab/uni", "vit_large_patch16_224", kwargs, 1024,
                         BatchTransform(224, 224), torch.float16, weights, device,
                         description="UNI ViT-L/16 class token")


@register_encoder("uni_v2", dim=1536, description="UNI2-h (Mahmood Lab), ViT-H/14 with 8 registers, 224 px",
                  needs=_needs("timm>=1.0", "MahmoodLab/UNI2-h"))
def build_uni_v2(weights=None, device=None) -> Encoder:
    import torch

    timm = _require("timm", "timm>=1.0", "uni_v2")
    kwargs = dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                  mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8, dynamic_img_size=True,
                  **_swiglu(timm))
    return _timm_encoder("uni_v2", "MahmoodLab/UNI2-h", "vit_giant_patch14_224", kwargs, 1536,
                         BatchTransform(224, 224), torch.bfloat16, weights, device,
                         description="UNI2-h ViT-H/14 class token")


@register_encoder("virchow2", dim=2560, description="Virchow2 (Paige), ViT-H/14 with 4 registers, 224 px",
                  needs=_needs("timm>=1.0", "paige-ai/Virchow2"))
def build_virchow2(weights=None, device=None) -> Encoder:
    import torch

    timm = _require("timm", "timm>=1.0", "virchow2")
    kwargs = dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
                  dynamic_img_size=True, **_swiglu(timm))
    return _timm_encoder("virchow2", "paige-ai/Virchow2", "vit_huge_patch14_224", kwargs, 2560,
                         BatchTransform(224, 224, interpolation="bicubic"), torch.float16, weights, device,
                         output="class_and_mean_patches",
                         description="Virchow2 class token + mean patch token (1280 + 1280)")


def _hoptimus(name: str, hub_id: str, weights, device) -> Encoder:
    import torch

    # vit_giant_patch14_reg4_dinov2 brings SwiGLU, SiLU, 4 registers and no_embed_class itself
    kwargs = dict(img_size=224, init_values=1e-5, num_classes=0, global_pool="token", dynamic_img_size=False)
    return _timm_encoder(name, hub_id, "vit_giant_patch14_reg4_dinov2", kwargs, 1536,
                         BatchTransform(224, 224, HOPTIMUS_MEAN, HOPTIMUS_STD), torch.float16, weights, device,
                         description=f"{hub_id.split('/')[1]} ViT-g/14 class token")


@register_encoder("hoptimus0", dim=1536, description="H-optimus-0 (Bioptimus), ViT-g/14 with 4 registers, 224 px",
                  needs=_needs("timm>=1.0", "bioptimus/H-optimus-0"))
def build_hoptimus0(weights=None, device=None) -> Encoder:
    return _hoptimus("hoptimus0", "bioptimus/H-optimus-0", weights, device)


@register_encoder("hoptimus1", dim=1536, description="H-optimus-1 (Bioptimus), ViT-g/14 with 4 registers, 224 px",
                  needs=_needs("timm>=1.0", "bioptimus/H-optimus-1"))
def build_hoptimus1(weights=None, device=None) -> Encoder:
    return _hoptimus("hoptimus1", "bioptimus/H-optimus-1", weights, device)


@register_encoder("gigapath", dim=1536, description="Prov-GigaPath tile encoder, ViT-g/16, 224 px crop of 256",
                  needs=_needs("timm>=1.0", "prov-gigapath/prov-gigapath"))
def build_gigapath(weights=None, device=None) -> Encoder:
    import torch

    # vit_giant_patch14_dinov2 brings SwiGLU and SiLU; GigaPath overrides the patch size to 16
    kwargs = dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                  init_values=1e-5, mlp_ratio=5.33334, num_classes=0)
    return _timm_encoder("gigapath", "prov-gigapath/prov-gigapath", "vit_giant_patch14_dinov2", kwargs, 1536,
                         BatchTransform(256, 224, interpolation="bicubic"), torch.float16, weights, device,
                         description="Prov-GigaPath tile encoder class token")


@register_encoder("phikon_v2", dim=1024, description="Phikon-v2 (Owkin), DINOv2 ViT-L/16, 224 px",
                  needs=_needs("transformers", "owkin/phikon-v2"))
def build_phikon_v2(weights=None, device=None) -> Encoder:
    """With ``weights``, the architecture comes from the config.json beside the file (as the
    hub repo lays them out), else from the hub's (cached) config."""
    import torch

    name, hub_id = "phikon_v2", "owkin/phikon-v2"
    transformers = _require("transformers", "transformers", name)
    if weights is not None:
        from napari_mil.encoders.custom import load_state_dict_checked

        folder = Path(weights).parent
        source = str(folder) if (folder / "config.json").exists() else hub_id
        config = _from_hub(name, hub_id, lambda: transformers.AutoConfig.from_pretrained(source))
        model = transformers.AutoModel.from_config(config)
        load_state_dict_checked(model, weights, name)
        digest = file_hash(weights)
    else:
        model = _from_hub(name, hub_id, lambda: transformers.AutoModel.from_pretrained(hub_id))
        digest = f"hub:{hub_id}"
    model = _modules().HiddenStateClassToken(model)
    return _encoder(name, model, BatchTransform(224, 224), torch.float32, 1024, digest, device,
                    "Phikon-v2 class token")


def _conch_v15_model(timm, arch="vit_large_patch16_224", img_size=448, dim=768, heads=8, stored_grid=14):
    trunk = timm.create_model(arch, pretrained=False, img_size=img_size, init_values=1.0, num_classes=0)
    return _modules().ConchV15Vision(trunk, dim, heads, stored_grid)


def _load_conch_v15(model, path, name: str, timm) -> None:
    """The official loading: a position table of another grid is first resampled (bilinear) to
    the trunk's stored grid; every other key must fit exactly."""
    from napari_mil.encoders.custom import load_state_dict_file

    state = load_state_dict_file(path)
    stored = model.trunk.pos_embed
    table = state.get("trunk.pos_embed")
    if table is not None and table.ndim == 3 and table.shape[1] != stored.shape[1]:
        grid = round((stored.shape[1] - 1) ** 0.5)
        state["trunk.pos_embed"] = timm.layers.resample_abs_pos_embed(
            table, new_size=(grid, grid), num_prefix_tokens=1, interpolation="bilinear", antialias=False)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of another shape
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise EncoderError(f"{Path(path).name} does not fit {name}: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys, result.unexpected_keys
        raise EncoderError(f"{Path(path).name} does not fit {name}: {len(missing)} missing (e.g. "
                           f"{', '.join(missing[:3])}); {len(unexpected)} unexpected "
                           f"(e.g. {', '.join(unexpected[:3])})")


@register_encoder("conch_v15", dim=768, description="CONCH v1.5 (Mahmood Lab), ViT-L/16 + attention pooling, 448 px",
                  needs=_needs("timm>=1.0", CONCH_V15_HUB))
def build_conch_v15(weights=None, device=None) -> Encoder:
    """Weights: ``pytorch_model_vision.bin`` of MahmoodLab/conchv1_5 (the CONCH v1.5 image tower
    that TITAN uses)."""
    import torch

    name = "conch_v15"
    timm = _require("timm", "timm>=1.0", name)
    if weights is not None:
        path, digest = weights, file_hash(weights)
    else:
        hub = _require("huggingface_hub", "huggingface_hub", name)
        path = _from_hub(name, CONCH_V15_HUB, lambda: hub.hf_hub_download(CONCH_V15_HUB, CONCH_V15_FILE))
        digest = f"hub:{CONCH_V15_HUB}"
    model = _conch_v15_model(timm)
    _load_conch_v15(model, path, name, timm)
    return _encoder(name, model, BatchTransform(448, 448), torch.float16, 768, digest, device,
                    "CONCH v1.5 image embedding")

