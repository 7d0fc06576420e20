"""What the pseudo-labels look like before any training: a sweep of the clustering settings against the true
identities (chosen on split 1, never on the test split), and pictures of clusters with their two GRACL proxies.

`sweep` extracts the features once and computes the Jaccard graph once per (k1, k2); every (eps, min_samples)
is then one DBSCAN on it, so a grid costs seconds after the features.
`cluster_grid` draws a few clusters, one row each: its members, the inter-ID proxy framed blue, the intra-ID
proxy framed orange, and a red bar under every member whose true identity is not the cluster's majority."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import Sample
from ..data.transforms import load_rgb
from .memory import inter_proxy_index, intra_proxy_index
from .pseudo_labels import cluster_stats, dbscan, jaccard_neighbors


def sweep(features: np.ndarray, true_ids: np.ndarray, cameras: np.ndarray, eps: list[float], min_samples: list[int],
          k1: list[int], k2: list[int]) -> list[dict]:
    """One row per setting: the setting and `cluster_stats` against the true identities, plus the pair F1
    (harmonic mean of pair precision and recall). Settings are chosen by NMI (`best`), which counts every
    outlier as its own cluster: pair precision and recall see the clustered samples only, so they reward a
    setting that drops most images as outliers (on CUHK03, F1 picked one leaving 88% of the images out)."""
    rows = []
    for a, b in itertools.product(k1, k2):
        graph = jaccard_neighbors(features, a, b, max_distance=max(eps))
        for e, m in itertools.product(eps, min_samples):
            labels = dbscan(*graph, eps=e, min_samples=m)
            stats = cluster_stats(labels, true_ids, cameras).as_dict()
            p, r = stats["pairwise_precision"] or 0.0, stats["pairwise_recall"] or 0.0
            rows.append({"k1": a, "k2": b, "eps": e, "min_samples": m, **stats,
                         "pair_f1": 2 * p * r / (p + r) if p + r else 0.0})
    return rows


def best(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: r["nmi"])


def sweep_markdown(rows: list[dict], title: str) -> str:
    chosen = best(rows)
    lines = [f"### {title}", "",
             "| k1 | k2 | eps | min_samples | clusters | outliers | largest | multi-camera | pair precision | pair recall "
             "| pair F1 | NMI |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **(chosen)**" if r is chosen else ""
        lines.append(f"| {r['k1']} | {r['k2']} | {r['eps']} | {r['min_samples']}{mark} | {r['clusters']} | "
                     f"{100 * r['outlier_share']:.0f}% | {r['largest']} | {100 * (r['multi_camera_share'] or 0):.0f}% | "
                     f"{100 * (r['pairwise_precision'] or 0):.1f}% | "
                     f"{100 * (r['pairwise_recall'] or 0):.1f}% | {100 * r['pair_f1']:.1f}% | {r['nmi']:.3f} |")
    return "\n".join(lines) + "\n"


def cluster_grid(samples: list[Sample], features: np.ndarray, labels: np.ndarray, path: str | Path,
                 clusters: int = 8, max_members: int = 12, seed: int = 0, thumb: tuple[int, int] = (40, 80)) -> Path:
    """`clusters` clusters drawn at random (seeded), one row each; see the module docstring for the frames."""
    from PIL import Image, ImageDraw

    num_clusters = int(labels.max()) + 1
    feats, lab = torch.from_numpy(features), torch.from_numpy(labels).long()
    inter = inter_proxy_index(feats, lab, num_clusters).numpy()
    intra = intra_proxy_index(feats, lab, num_clusters).numpy()
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(num_clusters, size=min(clusters, num_clusters), replace=False).tolist())
    w, h = thumb
    canvas = Image.new("RGB", (max_members * (w + 6) + 8, len(chosen) * (h + 14) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for row, c in enumerate(chosen):
        members = np.flatnonzero(labels == c)
        proxies = [i for i in (inter[c], intra[c]) if i >= 0]
        shown = list(dict.fromkeys(proxies + members.tolist()))[:max_members]  # the proxies always shown
        ids = [samples[i].pid for i in members]
        majority = max(set(ids), key=ids.count)
        y = row * (h + 14) + 4
        for col, i in enumerate(shown):
            x = col * (w + 6) + 4
            canvas.paste(load_rgb(samples[i].path).resize(thumb), (x, y))
            if i == inter[c] or i == intra[c]:
                colour = "blue" if i == inter[c] else "orange"
                draw.rectangle([x - 2, y - 2, x + w + 1, y + h + 1], outline=colour, width=3)
            if samples[i].pid >= 0 and samples[i].pid != majority:
                draw.rectangle([x, y + h + 4, x + w, y + h + 8], fill="red")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
