"""Backbone + global average pooling (+ optional linear projection) + BNNeck (Luo et al. 2019).

The projection is NFormer's encoder (`Baseline` in the official code: 2048 -> 256): the Neighbor Transformer
works on the projected features, and a 256-d index is five times cheaper to search than 1280-d.

Training returns (pre-BN feature for the metric losses, logits for the ID loss); inference returns the
post-BN feature, which is what gets exported and searched."""

from __future__ import annotations

import torch
from torch import nn

from .backbones import build_backbone


class ReIDModel(nn.Module):
    def __init__(self, backbone: str, num_classes: int, pretrained=False, last_stride: int = 1,
                 embedding_dim: int = 0):
        super().__init__()
        self.backbone = build_backbone(backbone, pretrained=pretrained, last_stride=last_stride)
        dim = self.backbone.out_channels
        # 0 keeps the backbone's width; otherwise Linear(width -> embedding_dim) with bias, default init
        self.projection = nn.Linear(dim, embedding_dim) if embedding_dim else nn.Identity()
        dim = embedding_dim or dim
        self.bottleneck = nn.BatchNorm1d(dim)
        self.bottleneck.bias.requires_grad_(False)  # BNNeck: no shift, as in the strong baseline
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.embedding_dim = dim

    def forward(self, images: torch.Tensor):
        global_feature = self.projection(self.backbone(images).mean(dim=(2, 3)))
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
