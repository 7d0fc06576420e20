"""Evaluation of the deployed model on a gallery's labeled images with the project's one evaluator
(index/metrics.py, as ``reid evaluate``): uploaded labeled queries, or the gallery's own labeled images
as queries one at a time (leave-one-out: the query's own image is removed by the protocol's
same-person-same-camera rule, so every image needs a camera).

Person and camera labels are strings here; they are mapped to integer codes from 1 (no label is junk).
"""

from __future__ import annotations

import numpy as np

from index.metrics import NothingToEvaluate, RetrievalMetrics, evaluate_features

from .calibration import CalibrationError, labeled_vectors


def _codes(*columns: list[str]) -> list[np.ndarray]:
    """Map the string labels of several columns to shared integer codes starting at 1."""
    vocab = {v: i + 1 for i, v in enumerate(sorted({x for col in columns for x in col}))}
    return [np.array([vocab[x] for x in col], dtype=np.int64) for col in columns]


def evaluate_gallery(store, gallery: str, limit: int, queries: np.ndarray | None = None,
                     query_pids: list[str] | None = None, query_cams: list[str] | None = None
                     ) -> tuple[RetrievalMetrics, int]:
    """(metrics, gallery size). Without ``queries``: leave-one-out over the gallery's labeled images."""
    _, pids, cams, vecs = labeled_vectors(store, gallery, limit)
    if len(pids) < 2:
        raise CalibrationError("too_few_labeled_images", f"gallery {gallery!r} has {len(pids)} image(s) with a "
                                                         "person_id; evaluation needs labeled gallery images")
    if any(c is None for c in cams):
        raise CalibrationError("camera_required", "every labeled gallery image needs a camera_id (the protocol "
                                                  "ignores same-person same-camera matches)")
    if queries is None:
        queries, query_pids, query_cams = vecs, pids, cams
    qp, gp = _codes(query_pids, pids)
    qc, gc = _codes(query_cams, cams)
    try:
        return evaluate_features(queries, vecs, qp, gp, qc, gc), len(pids)
    except NothingToEvaluate as e:
        raise CalibrationError("nothing_to_evaluate", str(e)) from None
