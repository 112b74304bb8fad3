"""``resnet50_trunc``: ImageNet ResNet-50 up to layer3, average-pooled to 1024-d (CLAM's standard).

The network is written here in plain torch with torchvision's parameter names, so torchvision
is not needed at run time. Weights come from a local file in torchvision's key layout
(``weights=``), else from torchvision or timm when either is installed and can fetch its
ImageNet weights.
"""

from __future__ import annotations

from napari_mil.encoders.base import Encoder, file_hash, register_encoder
from napari_mil.errors import EncoderError


def _resnet50_trunc():
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: bool = False):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = (
                nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))
                if downsample else None
            )

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + identity)

    class ResNet50Trunc(nn.Module):
        """conv1 .. layer3 of ResNet-50, then global average pooling: (B, 3, H, W) -> (B, 1024)."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.layer1 = self._layer(64, 64, 3, 1)
            self.layer2 = self._layer(256, 128, 4, 2)
            self.layer3 = self._layer(512, 256, 6, 2)
            self.pool = nn.AdaptiveAvgPool2d(1)

        @staticmethod
        def _layer(inplanes, planes, blocks, stride):
            layers = [Bottleneck(inplanes, planes, stride, downsample=True)]
            layers += [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer3(self.layer2(self.layer1(x)))  # (B, 1024, H/16, W/16)
            return torch.flatten(self.pool(x), 1)  # (B, 1024)

    return ResNet50Trunc()


def _pretrained_state_dict() -> tuple[dict, str]:
    """ImageNet weights from torchvision, else timm; EncoderError when neither can provide them."""
    reasons = []
    try:
        from torchvision.models import ResNet50_Weights, resnet50

        return resnet50(weights=ResNet50_Weights.IMAGENET1K_V1).state_dict(), "torchvision:IMAGENET1K_V1"
    except Exception as exc:  # missing, broken C ops, or offline
        reasons.append(f"torchvision: {type(exc).__name__}")
    try:
        import timm

        return timm.create_model("resnet50.tv_in1k", pretrained=True).state_dict(), "timm:resnet50.tv_in1k"
    except Exception as exc:
        reasons.append(f"timm: {type(exc).__name__}")
    raise EncoderError(
        "resnet50_trunc needs ImageNet weights: install torchvision or timm with internet access, or pass "
        "--weights resnet50.pth (a torchvision-layout state dict, e.g. resnet50-0676ba61.pth) "
        f"[{'; '.join(reasons)}]"
    )


@register_encoder("resnet50_trunc", dim=1024, description="ImageNet ResNet-50 to layer3, mean-pooled (CLAM)",
                  needs="a torchvision-layout weights file, or torchvision/timm with internet access")
def build_resnet50_trunc(weights=None, device=None) -> Encoder:
    import torch

    from napari_mil.encoders.custom import load_state_dict_checked
    from napari_mil.encoders.transforms import BatchTransform

    model = _resnet50_trunc()
    if weights is not None:
        load_state_dict_checked(model, weights, "resnet50_trunc")
        digest = file_hash(weights)
    else:
        state, digest = _pretrained_state_dict()
        model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=True)
    model = model.to(device).eval()
    transform = BatchTransform(resize=224, crop=None)  # CLAM: ToTensor + ImageNet normalisation at 224
    precision = torch.float16 if device.type == "cuda" else torch.float32
    return Encoder("resnet50_trunc", model, transform, precision, 1024, 224, digest, device,
                   "ImageNet ResNet-50 truncated after layer3")
