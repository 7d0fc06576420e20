"""Feature extraction with a torch model (training-time evaluation). The service and `reid evaluate`
on a bundle embed with ONNX Runtime instead; both feed the same evaluator (`index.metrics`)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from index.metrics import RetrievalMetrics, evaluate_features

from .data.batch_augment import Augmentation, BatchAugment
from .data.datasets import ReIDDataset, Sample
from .data.transforms import InputSpec, TestTransform, load_rgb


@torch.no_grad()
def extract_features(model, samples: list[Sample], spec: InputSpec, batch_size: int = 64,
                     device: str = "cpu", desc: str = "features", transform=None) -> np.ndarray:
    """Eval-mode features; `transform` defaults to the test transform (NFormer's feature bank passes the
    training augmentation)."""
    model.eval()
    transform = transform or TestTransform(spec)
    chunks = []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch", leave=False):
        batch = np.stack([transform(load_rgb(s.path)) for s in samples[start:start + batch_size]])
        images = torch.from_numpy(batch).to(device).contiguous(memory_format=torch.channels_last)
        chunks.append(model(images).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


@torch.no_grad()
def extract_decoded_features(model, images: torch.Tensor, spec: InputSpec, batch_size: int = 128,
                             desc: str = "features") -> np.ndarray:
    """Eval-mode features of images already decoded and resized to the input size (uint8 [N,3,H,W], as
    `DecodedImages` holds them): the test transform's normalisation only, no file read again."""
    model.eval()
    normalize = BatchAugment(spec, Augmentation(flip_p=0.0, pad=0, erase_p=0.0))  # the training batches' scaling
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        chunks.append(model(normalize(images[start:start + batch_size])).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def evaluate_model(model, dataset: ReIDDataset, spec: InputSpec, device: str = "cpu") -> RetrievalMetrics:
    q = extract_features(model, dataset.query, spec, device=device, desc=f"{dataset.name} query")
    g = extract_features(model, dataset.gallery, spec, device=device, desc=f"{dataset.name} gallery")
    return evaluate_features(
        q, g,
        [s.pid for s in dataset.query], [s.pid for s in dataset.gallery],
        [s.camid for s in dataset.query], [s.camid for s in dataset.gallery],
    )
