"""The training set decoded once into memory, and the strong-baseline augmentation done per batch in torch.

Per-sample PIL augmentation cost about as much CPU as the model's forward pass at 128x64: every image was
re-decoded, resized, flipped, padded and erased in Python, one at a time. Here each image is decoded and
resized once (uint8, 24 KiB at 128x64), and a batch is flipped, padded + cropped, erased and normalised as
tensors. The augmentation is the same as `TrainTransform`'s (resize, flip, pad 10 + random crop with the mean
colour, random erasing with noise), plus optional colour jitter."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .datasets import Sample
from .transforms import InputSpec, load_rgb


class DecodedImages:
    """Every sample decoded and resized to the input size once: `images` uint8 [N,3,H,W]."""

    def __init__(self, samples: list[Sample], height: int, width: int, progress: bool = True):
        self.images = torch.empty((len(samples), 3, height, width), dtype=torch.uint8)
        for i, sample in enumerate(tqdm(samples, desc="decoding", unit="img", disable=not progress, leave=False)):
            resized = load_rgb(sample.path).resize((width, height), Image.BILINEAR)
            self.images[i] = torch.from_numpy(np.array(resized)).permute(2, 0, 1)
        self.labels = torch.tensor([s.pid for s in samples], dtype=torch.long)


@dataclass(frozen=True)
class Augmentation:
    flip_p: float = 0.5
    pad: int = 10
    erase_p: float = 0.5
    # brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s] per image (0 = off):
    # the cameras of one person differ mostly in colour response and lighting
    color_jitter: float = 0.0


def _luma(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] RGB -> [B,1,H,W] grey (ITU-R 601 weights)."""
    return (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)


class BatchAugment:
    """uint8 [B,3,H,W] -> normalised float32 [B,3,H,W] in channels_last, augmented per image."""

    def __init__(self, spec: InputSpec, augmentation: Augmentation = Augmentation(), seed: int = 0):
        self.aug = augmentation
        self.generator = torch.Generator().manual_seed(seed)
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1) * 255

    def _uniform(self, *shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        b, _, h, w = x.shape
        if self.aug.color_jitter:
            x = self._jitter(x)
        x = (x - self.mean) / self.std
        flip = self._uniform(b) < self.aug.flip_p
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
        if self.aug.pad:
            # zero after normalisation = the mean colour, as TrainTransform pads
            padded = F.pad(x, (self.aug.pad,) * 4)
            offsets = torch.randint(0, 2 * self.aug.pad + 1, (b, 2), generator=self.generator).tolist()
            x = torch.stack([padded[i, :, t:t + h, l:l + w] for i, (t, l) in enumerate(offsets)])
        erase = (self._uniform(b) < self.aug.erase_p).tolist()
        for i in (i for i, e in enumerate(erase) if e):
            self._erase(x[i])
        return x.contiguous(memory_format=torch.channels_last)

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        s, b = self.aug.color_jitter, x.shape[0]
        brightness, contrast, saturation = (1 + s * (2 * self._uniform(3, b) - 1)).view(3, b, 1, 1, 1)
        x = x * brightness
        mean_luma = _luma(x).mean(dim=(2, 3), keepdim=True)
        x = (x - mean_luma) * contrast + mean_luma
        luma = _luma(x)
        return (luma + (x - luma) * saturation).clamp_(0, 255)

    def _erase(self, image: torch.Tensor) -> None:
        """Random erasing (Zhong et al.), in place: a rectangle of 2-40% area, aspect 0.3-3.3, noise-filled."""
        _, h, w = image.shape
        for _ in range(100):
            area_share, log_aspect = self._uniform(2).tolist()
            area = (0.02 + 0.38 * area_share) * h * w
            aspect = float(np.exp(np.log(0.3) + log_aspect * 2 * np.log(1 / 0.3)))
            eh, ew = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if 0 < eh < h and 0 < ew < w:
                y = int(torch.randint(0, h - eh, (1,), generator=self.generator))
                x = int(torch.randint(0, w - ew, (1,), generator=self.generator))
                image[:, y:y + eh, x:x + ew] = torch.randn((3, eh, ew), generator=self.generator)
                return
