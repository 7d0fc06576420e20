"""ReID losses of the strong baseline (Luo et al. 2019): label-smoothed cross-entropy,
batch-hard triplet, center loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropyLabelSmooth(nn.Module):
    def __init__(self, num_classes: int, epsilon: float = 0.1):
        super().__init__()
        self.num_classes, self.epsilon = num_classes, epsilon

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits, dim=1)
        smoothed = torch.full_like(log_probs, self.epsilon / self.num_classes)
        smoothed.scatter_(1, targets.unsqueeze(1), 1 - self.epsilon + self.epsilon / self.num_classes)
        return -(smoothed * log_probs).sum(dim=1).mean()


class BatchHardTripletLoss(nn.Module):
    """For each anchor: hardest positive (farthest same id) vs hardest negative (closest other id),
    Euclidean distance, margin ranking loss."""

    def __init__(self, margin: float = 0.3):
        super().__init__()
        self.margin = margin

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dist = torch.cdist(features, features).clamp_min(1e-12)
        same = targets[:, None] == targets[None, :]
        hardest_pos = dist.masked_fill(~same, float("-inf")).max(dim=1).values
        hardest_neg = dist.masked_fill(same, float("inf")).min(dim=1).values
        return F.relu(hardest_pos - hardest_neg + self.margin).mean()


class CenterLoss(nn.Module):
    """Wen et al. 2016: pulls features to a learned per-class centre (trained with its own SGD)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (features - self.centers[targets]).pow(2).sum(dim=1).mean() / 2
