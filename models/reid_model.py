"""Backbone + global average pooling + BNNeck (Luo et al. 2019).

Training returns (pre-BN feature for the metric losses, logits for the ID loss); inference returns the
post-BN feature, which is what gets exported and searched."""

from __future__ import annotations

import torch
from torch import nn

from .backbones import build_backbone


class ReIDModel(nn.Module):
    def __init__(self, backbone: str, num_classes: int, pretrained=False, last_stride: int = 1):
        super().__init__()
        self.backbone = build_backbone(backbone, pretrained=pretrained, last_stride=last_stride)
        dim = self.backbone.out_channels
        self.bottleneck = nn.BatchNorm1d(dim)
        self.bottleneck.bias.requires_grad_(False)  # BNNeck: no shift, as in the strong baseline
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.embedding_dim = dim

    def forward(self, images: torch.Tensor):
        global_feature = self.backbone(images).mean(dim=(2, 3))
        bn_feature = self.bottleneck(global_feature)
        if self.training:
            return global_feature, self.classifier(bn_feature)
        return bn_feature


class NormalizedEncoder(nn.Module):
    """What the bundle's `encoder.onnx` computes: the inference feature, L2-normalised."""

    def __init__(self, model: ReIDModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.model(images), dim=1)
