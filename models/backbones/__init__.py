"""Backbones by name. Each returns a module mapping images [B,3,H,W] to a feature map [B,C,h,w] and
exposes `out_channels`, `input_mean`, `input_std` (the normalisation its pretrained weights expect)."""

from __future__ import annotations

from .efficientnet_lite import efficientnet_lite0, efficientnet_lite1, efficientnet_lite2
from .resnet import resnet18, resnet34, resnet50

BACKBONES = {
    "efficientnet_lite0": efficientnet_lite0,
    "efficientnet_lite1": efficientnet_lite1,
    "efficientnet_lite2": efficientnet_lite2,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}


def build_backbone(name: str, pretrained: str | bool = False, last_stride: int = 1):
    """`pretrained`: False, True (the weights this project can find offline), or a path to a state_dict."""
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}") from None
    return factory(pretrained=pretrained, last_stride=last_stride)
