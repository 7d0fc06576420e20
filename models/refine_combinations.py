"""Issue 15's combinations: k-reciprocal re-ranking on NFormer-refined features, and NFormer on k-reciprocal
candidates, against each alone, with the serving code (`index.refine.Refiner` over the bundle's NFormer
graph, `index.rerank`). Study only: a combination becomes a refine mode of the service if it wins here, as
`local>kreciprocal` did (the service's `local_kreciprocal`, which this study now runs itself).

Every variant ranks the same K cosine candidates of each query (the service's FAISS candidates); gallery
entries outside them keep their cosine shifted below every candidate, as `Refiner.similarities` does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from index.metrics import RetrievalMetrics, evaluate_rankings
from index.refine import Refiner

from .data.datasets import ReIDDataset

#: how far `kreciprocal>local` looks before it keeps K: k-reciprocal over this many x K cosine candidates
WIDEN = 2.5


def _local(r: Refiner, q: np.ndarray, g: np.ndarray, cos: np.ndarray) -> np.ndarray:
    return r.rerank("local", q, g)[0]


def _kreciprocal(r: Refiner, q: np.ndarray, g: np.ndarray, cos: np.ndarray) -> np.ndarray:
    return r.rerank("kreciprocal", q, g)[0]


def _local_then_kreciprocal(r: Refiner, q: np.ndarray, g: np.ndarray, cos: np.ndarray) -> np.ndarray:
    """k-reciprocal re-ranking of the NFormer-refined query and candidates: the shipped mode."""
    return r.rerank("local_kreciprocal", q, g)[0]


def _mean(r: Refiner, q: np.ndarray, g: np.ndarray, cos: np.ndarray) -> np.ndarray:
    """Score fusion: the mean of the two refined similarities (both in the cosine's range)."""
    return 0.5 * (_local(r, q, g, cos) + _kreciprocal(r, q, g, cos))


VARIANTS: dict[str, Callable] = {
    "local": _local,
    "kreciprocal": _kreciprocal,
    "local>kreciprocal": _local_then_kreciprocal,
    "mean(local, kreciprocal)": _mean,
}


def _kreciprocal_then_local(r: Refiner, query: np.ndarray, gallery: np.ndarray, cosine_row: np.ndarray,
                            k: int) -> tuple[np.ndarray, np.ndarray]:
    """NFormer on k-reciprocal candidates: k-reciprocal over WIDEN x K cosine candidates picks K, in its
    order; NFormer then ranks those K. Returns (candidate ids, scores)."""
    wide = r.with_candidates(int(round(WIDEN * k))).candidate_ids(cosine_row, gallery)
    krec = r.rerank("kreciprocal", query, gallery[wide])[0]
    keep = wide[np.argsort(-krec, kind="stable")[:k]]
    return keep, r.rerank("local", query, gallery[keep])[0]


def variant_similarities(refiner: Refiner, variant: str, query: np.ndarray, gallery: np.ndarray,
                         k: int) -> np.ndarray:
    """[Q,G] scores of one variant on each query's K candidates."""
    cosine = query @ gallery.T
    out = cosine - 10.0
    r = refiner.with_candidates(k)
    for qi in range(len(query)):
        q = query[qi:qi + 1]
        if variant == "kreciprocal>local":
            ids, scores = _kreciprocal_then_local(r, q, gallery, cosine[qi], k)
        else:
            ids = r.candidate_ids(cosine[qi], gallery)
            scores = VARIANTS[variant](r, q, gallery[ids], cosine[qi, ids])
        out[qi, ids] = scores
    return out


ALL_VARIANTS = ("none", *VARIANTS, "kreciprocal>local")


def evaluate_variants(refiner: Refiner, dataset: ReIDDataset, query: np.ndarray, gallery: np.ndarray,
                      k: int = 200, variants=ALL_VARIANTS) -> dict[str, RetrievalMetrics]:
    ids = ([s.pid for s in dataset.query], [s.pid for s in dataset.gallery], [s.camid for s in dataset.query],
           [s.camid for s in dataset.gallery])
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    results = {}
    for variant in tqdm(variants, desc=f"{dataset.name} combinations", leave=False):
        scores = query @ gallery.T if variant == "none" else variant_similarities(refiner, variant, query, gallery, k)
        results[variant] = evaluate_rankings(-scores, *ids)
    return results


def markdown(results: dict[str, dict[str, RetrievalMetrics]], k: int) -> str:
    """One table: rows = variants, columns = protocols (rank-1 / mAP, percent)."""
    names = list(results)
    variants = list(next(iter(results.values())))
    lines = [f"| variant (K = {k}) | " + " | ".join(f"{n} R1 / mAP" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for v in variants:
        cells = [f"{100 * results[n][v].ranks['rank1']:.1f} / {100 * results[n][v].mAP:.1f}" for n in names]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
