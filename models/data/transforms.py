"""Train/test transforms with PIL + numpy (no torchvision): resize, flip, pad+crop, random erasing,
normalisation. Output: float32 CHW arrays; the loader stacks them into tensors."""

from __future__ import annotations

import numpy as np
from PIL import Image

from index.bundle import InputSpec  # the bundle's input block: what these transforms produce


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def to_normalized_chw(image: Image.Image, spec: InputSpec) -> np.ndarray:
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


class TestTransform:
    """Resize to the input size (bilinear) and normalise: exactly what the service does."""

    __test__ = False  # not a pytest class

    def __init__(self, spec: InputSpec):
        self.spec = spec

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.resize((self.spec.width, self.spec.height), Image.BILINEAR)
        return to_normalized_chw(image, self.spec)


class TrainTransform:
    """Strong-baseline augmentation: resize, random flip, pad 10 + random crop, random erasing."""

    def __init__(self, spec: InputSpec, flip_p: float = 0.5, pad: int = 10, erase_p: float = 0.5, seed=None):
        self.spec, self.flip_p, self.pad, self.erase_p = spec, flip_p, pad, erase_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: Image.Image) -> np.ndarray:
        h, w = self.spec.height, self.spec.width
        image = image.resize((w, h), Image.BILINEAR)
        if self.rng.random() < self.flip_p:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = to_normalized_chw(image, self.spec)
        if self.pad:
            array = np.pad(array, ((0, 0), (self.pad, self.pad), (self.pad, self.pad)))
            top, left = self.rng.integers(0, 2 * self.pad + 1, size=2)
            array = array[:, top:top + h, left:left + w]
        if self.rng.random() < self.erase_p:
            array = self._erase(array)
        return np.ascontiguousarray(array)

    def _erase(self, array: np.ndarray) -> np.ndarray:
        """Random erasing (Zhong et al.): a rectangle of 2-40% area, aspect 0.3-3.3, filled with noise."""
        _, h, w = array.shape
        for _ in range(100):
            area = self.rng.uniform(0.02, 0.4) * h * w
            aspect = np.exp(self.rng.uniform(np.log(0.3), np.log(1 / 0.3)))
            eh, ew = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if 0 < eh < h and 0 < ew < w:
                y, x = self.rng.integers(0, h - eh), self.rng.integers(0, w - ew)
                array = array.copy()
                array[:, y:y + eh, x:x + ew] = self.rng.standard_normal((3, eh, ew)).astype(np.float32)
                return array
        return array
