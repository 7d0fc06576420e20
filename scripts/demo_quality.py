"""What the demo prints besides its one answer, so that its first screen shows the model's quality and not one
query's luck: every query of the demo dataset searched over HTTP (``search:batch``, the whole gallery ranked),
those rankings scored by the project's one evaluator (index/metrics.py: rank-1 and mAP under the standard
protocol), and where a query's true match is in its answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.metrics import RetrievalMetrics, evaluate_rankings
from service.client import ReidClient, SearchHit


@dataclass
class GalleryQuality:
    metrics: RetrievalMetrics
    ranked: int  # gallery images in each query's answer
    gallery: int  # gallery images evaluated (those the service stored)
    refine: str  # the mode that ran

    def summary(self, queries: int) -> str:
        m = self.metrics
        depth = "all" if self.ranked >= self.gallery else f"the top {self.ranked} (a lower bound) of"
        return (f"over all {queries} queries, each ranked against {depth} {self.gallery} gallery images (refine "
                f"{self.refine}; index/metrics.py): rank-1 {100 * m.ranks['rank1']:.1f}%, mAP {100 * m.mAP:.1f}%, "
                f"{m.evaluated_queries} queries evaluated, {m.skipped_queries} without a match from another camera")


def true_match_rank(hits: Sequence[SearchHit], person: str, camera: str) -> int | None:
    """1-based rank of the first image of ``person`` from another camera than ``camera`` (the protocol's valid
    match: the same person seen by the query's own camera is not counted), None if the answer has none."""
    for rank, hit in enumerate(hits, 1):
        if hit.person_id == person and hit.camera_id != camera:
            return rank
    return None


def match_mark(hit: SearchHit, person: str, camera: str) -> str:
    """How the ranked table marks a result of the query's person."""
    if hit.person_id != person:
        return ""
    return "  <- true match" if hit.camera_id != camera else "  <- same person, same camera (not counted)"


def rankings(client: ReidClient, gallery: str, queries: Sequence[str | Path], top_k: int, refine: str | None,
             batch: int = 32) -> tuple[list[list[SearchHit]], str]:
    """Each query's ranked answer (``batch`` queries per ``search:batch`` request) and the mode that ran."""
    out: list[list[SearchHit]] = []
    applied = refine or "default"
    for start in range(0, len(queries), batch):
        answer = client.search_batch(gallery, queries[start:start + batch], top_k=top_k, refine=refine)
        out += [q.results for q in answer.queries]
        applied = answer.refine_applied
    return out, applied


def distance_matrix(answers: Sequence[Sequence[SearchHit]], gallery_ids: Sequence[int]) -> np.ndarray:
    """(queries, gallery) distances for the evaluator: each answer's rank order (ties in score keep the
    service's order), +inf for an image an answer does not hold."""
    column = {int(i): j for j, i in enumerate(gallery_ids)}
    dist = np.full((len(answers), len(gallery_ids)), np.inf)
    for qi, hits in enumerate(answers):
        for rank, hit in enumerate(hits):
            j = column.get(int(hit.id))
            if j is not None:
                dist[qi, j] = rank
    return dist


def gallery_quality(client: ReidClient, gallery: str, queries: Sequence, stored: Sequence[tuple[int, object]],
                    refine: str | None = "none", max_top_k: int = 1000) -> tuple[GalleryQuality, list[list[SearchHit]]]:
    """Rank-1 and mAP of ``queries`` (samples with ``path``, ``pid``, ``camid``) against the gallery images in
    ``stored`` (``(image id, sample)``: what the service stored), over HTTP; also each query's answer."""
    first: dict[int, object] = {}
    for image_id, sample in stored:  # the same bytes sent twice are one image: its first labels count
        first.setdefault(int(image_id), sample)
    stored = list(first.items())
    top_k = max(1, min(len(stored), max_top_k))
    answers, applied = rankings(client, gallery, [q.path for q in queries], top_k, refine)
    ids = [i for i, _ in stored]
    metrics = evaluate_rankings(distance_matrix(answers, ids),
                                np.array([q.pid for q in queries]), np.array([s.pid for _, s in stored]),
                                np.array([q.camid for q in queries]), np.array([s.camid for _, s in stored]))
    return GalleryQuality(metrics, top_k, len(stored), applied), answers
