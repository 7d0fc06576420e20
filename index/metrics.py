"""The one ReID evaluator: CMC, mAP and mINP under the standard protocol.

Used by training, `reid evaluate`, the benchmarks and the service, so every figure the project
reports comes from this file.

Protocol (Market-1501's official code, as torchreid and fast-reid follow it):
- gallery items with the same identity *and* the same camera as the query are ignored;
- junk gallery items (person id -1, Market's `-1_...` bad detections) are ignored;
- every other gallery item is ranked, Market's distractors (person id 0, `0000_...`) included: they are
  nobody's true match, so they count as wrong answers;
- a query with no valid match left in the gallery is skipped and counted in `skipped_queries`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .vector_index import l2_normalize

JUNK_PID = -1


class NothingToEvaluate(ValueError):
    """No query has a valid cross-camera match (e.g. everything comes from one camera)."""


@dataclass
class RetrievalMetrics:
    mAP: float
    mINP: float
    cmc: list[float]  # cmc[r-1] = fraction of evaluated queries with a match within the top r
    evaluated_queries: int
    skipped_queries: int
    ranks: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        r = self.ranks
        return (
            f"mAP {100 * self.mAP:.1f}  rank-1 {100 * r['rank1']:.1f}  rank-5 {100 * r['rank5']:.1f}  "
            f"rank-10 {100 * r['rank10']:.1f}  rank-20 {100 * r['rank20']:.1f}  mINP {100 * self.mINP:.1f}  "
            f"({self.evaluated_queries} queries, {self.skipped_queries} skipped)"
        )


def cosine_distance(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """1 - cosine similarity, rows L2-normalised here so callers may pass raw features."""
    return 1.0 - l2_normalize(query) @ l2_normalize(gallery).T


def evaluate_rankings(
    distmat: np.ndarray,
    query_pids: np.ndarray,
    gallery_pids: np.ndarray,
    query_camids: np.ndarray,
    gallery_camids: np.ndarray,
    max_rank: int = 50,
) -> RetrievalMetrics:
    """Evaluate a (num_query, num_gallery) distance matrix (smaller = more similar)."""
    distmat = np.asarray(distmat, dtype=np.float64)
    q_pids, g_pids = np.asarray(query_pids), np.asarray(gallery_pids)
    q_cams, g_cams = np.asarray(query_camids), np.asarray(gallery_camids)
    num_q, num_g = distmat.shape
    if (num_q, num_g) != (len(q_pids), len(g_pids)) or len(q_cams) != num_q or len(g_cams) != num_g:
        raise ValueError(f"distmat {distmat.shape} does not match {len(q_pids)} queries / {len(g_pids)} gallery labels")

    order = np.argsort(distmat, axis=1, kind="stable")
    ranked_pids, ranked_cams = g_pids[order], g_cams[order]
    matches = ranked_pids == q_pids[:, None]
    ignored = (matches & (ranked_cams == q_cams[:, None])) | (ranked_pids == JUNK_PID)
    matches &= ~ignored

    valid = matches.any(axis=1)
    if not valid.any():
        raise NothingToEvaluate(
            "no query has a valid match: every true match shares the query's camera (or is junk); "
            "cross-camera evaluation needs gallery images from other cameras"
        )
    matches, ignored = matches[valid], ignored[valid]

    # Position of each gallery item once ignored items are removed from the ranking.
    kept = ~ignored
    position = np.cumsum(kept, axis=1)  # 1-based rank among kept items
    hits_before = np.cumsum(matches, axis=1)
    num_rel = matches.sum(axis=1)

    first_hit = np.where(matches, position, np.iinfo(np.int64).max).min(axis=1)
    ranks = np.arange(1, max_rank + 1)
    cmc = (first_hit[:, None] <= ranks[None, :]).mean(axis=0)

    precision_at_hit = np.divide(hits_before, position, out=np.zeros(position.shape), where=matches)
    ap = precision_at_hit.sum(axis=1) / num_rel
    last_hit = np.where(matches, position, 0).max(axis=1)
    inp = num_rel / last_hit

    cmc_list = [float(x) for x in cmc]

    def rank(r: int) -> float:
        return cmc_list[min(r, max_rank) - 1]

    return RetrievalMetrics(
        mAP=float(ap.mean()),
        mINP=float(inp.mean()),
        cmc=cmc_list,
        evaluated_queries=int(valid.sum()),
        skipped_queries=int((~valid).sum()),
        ranks={f"rank{r}": rank(r) for r in (1, 5, 10, 20)},
    )


def evaluate_features(
    query_features: np.ndarray,
    gallery_features: np.ndarray,
    query_pids,
    gallery_pids,
    query_camids,
    gallery_camids,
    max_rank: int = 50,
) -> RetrievalMetrics:
    """Cosine-distance evaluation of embeddings."""
    return evaluate_rankings(
        cosine_distance(query_features, gallery_features),
        query_pids, gallery_pids, query_camids, gallery_camids, max_rank,
    )
