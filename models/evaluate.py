"""Evaluate a model bundle offline: embed a protocol's query and gallery images with the bundle's
`encoder.onnx` (ONNX Runtime, the training-side test transform) and score them with the one evaluator.
No torch needed. Also draws CMC curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from tqdm import tqdm

from index.bundle import load_bundle
from index.metrics import JUNK_PID, RetrievalMetrics, evaluate_features
from index.vector_index import l2_normalize

from .data.datasets import ReIDDataset, Sample
from .data.transforms import TestTransform, load_rgb


class BundleEncoder:
    def __init__(self, bundle_dir: str | Path, batch_size: int = 32, threads: int = 0):
        bundle = load_bundle(bundle_dir)  # the card checked against its files, as the service does
        self.spec = bundle.input_spec
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(bundle.encoder_path), options, providers=["CPUExecutionProvider"])
        self.transform, self.batch_size, self.card = TestTransform(self.spec), batch_size, bundle.card
        self.query_flip = bundle.query_flip

    def embed(self, samples: list[Sample], desc: str = "embedding", flip_average: bool = False) -> np.ndarray:
        """Features of the images (gallery-side, as stored); `flip_average`: each image's plus its mirror
        image's, L2-normalised (each file read once)."""
        chunks = []
        for start in tqdm(range(0, len(samples), self.batch_size), desc=desc, unit="batch", leave=False):
            images = [load_rgb(s.path) for s in samples[start:start + self.batch_size]]
            features = self._run(images)
            if flip_average:
                features = l2_normalize(features + self._run([im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                                                              for im in images]))
            chunks.append(features)
        return np.concatenate(chunks)

    def embed_queries(self, samples: list[Sample], desc: str = "embedding queries") -> np.ndarray:
        """Query features as the service computes them: flip-averaged when the card sets `query_flip`."""
        return self.embed(samples, desc, flip_average=self.query_flip)

    def _run(self, images: list) -> np.ndarray:
        return self.session.run(["features"], {"images": np.stack([self.transform(im) for im in images])})[0]


def embed_protocol(encoder: BundleEncoder, dataset: ReIDDataset) -> tuple[np.ndarray, np.ndarray]:
    if not dataset.query or not dataset.gallery:
        raise ValueError(f"{dataset.name} has no query/gallery split to evaluate")
    return (encoder.embed_queries(dataset.query, f"{dataset.name} query"),
            encoder.embed(dataset.gallery, f"{dataset.name} gallery"))


def evaluate_bundle(bundle_dir: str | Path, dataset: ReIDDataset, encoder: BundleEncoder | None = None,
                    ranklist: str | Path | None = None) -> RetrievalMetrics:
    """Metrics of the bundle on the dataset's protocol; optionally a rank-list picture."""
    q, g = embed_protocol(encoder or BundleEncoder(bundle_dir), dataset)
    if ranklist:
        plot_ranklist(q, g, dataset, ranklist)
    return evaluate_features(
        q, g,
        [s.pid for s in dataset.query], [s.pid for s in dataset.gallery],
        [s.camid for s in dataset.query], [s.camid for s in dataset.gallery],
    )


def plot_ranklist(q: np.ndarray, g: np.ndarray, dataset: ReIDDataset, path: str | Path, queries: int = 8,
                  top_k: int = 10, thumb: tuple[int, int] = (48, 96)) -> Path:
    """A grid: each row one query, then its top-k gallery images (same-identity-same-camera entries
    and junk skipped, as in the protocol), framed green for the right person, red otherwise."""
    from PIL import Image, ImageDraw

    w, h = thumb
    rows = dataset.query[:queries]
    canvas = Image.new("RGB", ((top_k + 1) * (w + 6) + 8, len(rows) * (h + 8)), "white")
    draw = ImageDraw.Draw(canvas)
    scores = q[: len(rows)] @ g.T
    for r, query in enumerate(rows):
        y = r * (h + 8) + 4
        canvas.paste(load_rgb(query.path).resize(thumb), (2, y))
        draw.rectangle([1, y - 1, w + 2, y + h], outline="black", width=2)
        shown = 0
        for j in np.argsort(-scores[r]):
            cand = dataset.gallery[j]
            if cand.pid == JUNK_PID or (cand.pid == query.pid and cand.camid == query.camid):
                continue
            x = (shown + 1) * (w + 6) + 8
            canvas.paste(load_rgb(cand.path).resize(thumb), (x, y))
            draw.rectangle([x - 2, y - 2, x + w + 1, y + h + 1], outline="green" if cand.pid == query.pid else "red",
                           width=3)
            shown += 1
            if shown == top_k:
                break
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


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
