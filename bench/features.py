"""Features of a shared protocol's query and gallery through an ONNX Runtime session, scored with the
project's evaluator (`index.metrics`): the one extraction the CMC, INT8 and search sections share."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from index.bundle import InputSpec
from index.metrics import RetrievalMetrics, evaluate_features
from models.data.datasets import ReIDDataset
from models.data.transforms import TestTransform, load_rgb

_ARRAYS: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
_FEATURES: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def arrays(bundle_card: dict, dataset: ReIDDataset) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed query and gallery images (kept: the INT8 section embeds them twice)."""
    key = (dataset.name, str(bundle_card["input"]))
    if key not in _ARRAYS:
        transform = TestTransform(InputSpec.from_card(bundle_card["input"]))
        _ARRAYS[key] = tuple(np.stack([transform(load_rgb(s.path)) for s in part])
                             for part in (dataset.query, dataset.gallery))
    return _ARRAYS[key]


def embed(session, x: np.ndarray, batch: int = 32) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def protocol_features(onnx_path: Path, bundle_card: dict, dataset: ReIDDataset,
                      session=None) -> tuple[np.ndarray, np.ndarray]:
    key = (str(onnx_path), dataset.name)
    if key not in _FEATURES:
        from .encoder import session as make_session

        sess = session or make_session(onnx_path)
        q, g = arrays(bundle_card, dataset)
        _FEATURES[key] = (embed(sess, q), embed(sess, g))
    return _FEATURES[key]


def score(dataset: ReIDDataset, q: np.ndarray, g: np.ndarray) -> RetrievalMetrics:
    return evaluate_features(q, g, [s.pid for s in dataset.query], [s.pid for s in dataset.gallery],
                             [s.camid for s in dataset.query], [s.camid for s in dataset.gallery])
