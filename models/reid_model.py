"""Backbone + pooling (+ optional linear projection) + BNNeck (Luo et al. 2019).

The projection is NFormer's encoder (`Baseline` in the official code: 2048 -> 256): the Neighbor Transformer
works on the projected features, and a 256-d index is five times cheaper to search than 1280-d.

Training returns (pre-BN feature for the metric losses, logits for the ID loss); inference returns the
post-BN feature, which is what gets exported and searched."""

from __future__ import annotations

import torch
from torch import nn

from .backbones import build_backbone

POOLINGS = ("avg", "gem")


class GeneralizedMeanPooling(nn.Module):
    """GeM (Radenovic et al. 2018): (mean x^p)^(1/p) over the map, p learned from 3 (1 = average, inf = max).
    It weights the strongest activations more, which suits a person filling only part of the crop."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class ReIDModel(nn.Module):
    def __init__(self, backbone: str, num_classes: int, pretrained=False, last_stride: int = 1,
                 embedding_dim: int = 0, pooling: str = "avg"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")
        self.backbone = build_backbone(backbone, pretrained=pretrained, last_stride=last_stride)
        self.pool = GeneralizedMeanPooling() if pooling == "gem" else None
        dim = self.backbone.out_channels
        # 0 keeps the backbone's width; otherwise Linear(width -> embedding_dim) with bias, default init
        self.projection = nn.Linear(dim, embedding_dim) if embedding_dim else nn.Identity()
        dim = embedding_dim or dim
        self.bottleneck = nn.BatchNorm1d(dim)
        self.bottleneck.bias.requires_grad_(False)  # BNNeck: no shift, as in the strong baseline
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.embedding_dim = dim
        self.frozen_front: list[nn.Module] = []

    def freeze_front(self, stages: int) -> None:
        """Keep the stem and the first `stages` backbone stages at their ImageNet weights and BN statistics.
        Their edges and colours transfer as they are, and skipping their backward pass (the most expensive
        per parameter: the largest feature maps) trains 1.4x faster at 2 stages on EfficientNet-Lite0."""
        self.frozen_front = self.backbone.front(stages)
        self.set_backbone_trainable(True)

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Whole-backbone switch (the first epochs train only the head); the frozen front stays frozen."""
        frozen = {id(p) for module in self.frozen_front for p in module.parameters()}
        for param in self.backbone.parameters():
            param.requires_grad_(trainable and id(param) not in frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_front:
            module.train(False)
        return self

    def forward(self, images: torch.Tensor):
        feature_map = self.backbone(images)
        pooled = self.pool(feature_map) if self.pool is not None else feature_map.mean(dim=(2, 3))
        global_feature = self.projection(pooled)
        bn_feature = self.bottleneck(global_feature)
        if self.training:
            return global_feature, self.classifier(bn_feature)
        return bn_feature


class NormalizedEncoder(nn.Module):
    """What the bundle's `encoder.onnx` computes: the inference feature, L2-normalised. With `flip_average`
    the feature of the image and of its mirror image are summed first (twice the encoder's cost)."""

    def __init__(self, model: ReIDModel, flip_average: bool = False):
        super().__init__()
        self.model = model
        self.flip_average = flip_average

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model(images)
        if self.flip_average:
            features = features + self.model(images.flip(3))
        return nn.functional.normalize(features, dim=1)
