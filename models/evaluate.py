"""Evaluate a model bundle offline: embed a protocol's query and gallery images with the bundle's
`encoder.onnx` (ONNX Runtime, the training-side test transform) and score them with the one evaluator.
No torch needed. Also draws CMC curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from index.metrics import RetrievalMetrics, evaluate_features

from .data.datasets import ReIDDataset, Sample
from .data.transforms import InputSpec, TestTransform, load_rgb


class BundleEncoder:
    def __init__(self, bundle_dir: str | Path, batch_size: int = 32, threads: int = 0):
        bundle_dir = Path(bundle_dir)
        card = json.loads((bundle_dir / "model.json").read_text())
        inp = card["input"]
        self.spec = InputSpec(inp["height"], inp["width"], tuple(inp["mean"]), tuple(inp["std"]))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(bundle_dir / "encoder.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.transform, self.batch_size, self.card = TestTransform(self.spec), batch_size, card

    def embed(self, samples: list[Sample], desc: str = "embedding") -> np.ndarray:
        chunks = []
        for start in tqdm(range(0, len(samples), self.batch_size), desc=desc, unit="batch", leave=False):
            batch = np.stack([self.transform(load_rgb(s.path)) for s in samples[start:start + self.batch_size]])
            chunks.append(self.session.run(["features"], {"images": batch})[0])
        return np.concatenate(chunks)


def evaluate_bundle(bundle_dir: str | Path, dataset: ReIDDataset, encoder: BundleEncoder | None = None) -> RetrievalMetrics:
    if not dataset.query or not dataset.gallery:
        raise ValueError(f"{dataset.name} has no query/gallery split to evaluate")
    encoder = encoder or BundleEncoder(bundle_dir)
    q = encoder.embed(dataset.query, f"{dataset.name} query")
    g = encoder.embed(dataset.gallery, f"{dataset.name} gallery")
    return evaluate_features(
        q, g,
        [s.pid for s in dataset.query], [s.pid for s in dataset.gallery],
        [s.camid for s in dataset.query], [s.camid for s in dataset.gallery],
    )


def plot_cmc(results: dict[str, RetrievalMetrics], path: str | Path, max_rank: int = 20) -> Path:
    """One CMC curve per dataset (rank 1..max_rank), mAP in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ranks = np.arange(1, max_rank + 1)
    for name, metrics in results.items():
        cmc = np.asarray(metrics.cmc[:max_rank]) * 100
        ax.plot(ranks[: len(cmc)], cmc, marker="o", markersize=3,
                label=f"{name} (R1 {cmc[0]:.1f}, mAP {100 * metrics.mAP:.1f})")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks([1, 5, 10, 15, 20])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("CMC")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
