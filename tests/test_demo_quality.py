"""scripts/demo_quality.py against a real server (uvicorn, Redis, ONNX Runtime): the rank-1 / mAP it computes
from the HTTP answers equal index/metrics.py's on the stored vectors themselves, and a query's true match is
found where its answer holds it."""

from __future__ import annotations

import pytest

from index.metrics import evaluate_features
from index.store import RedisStore
from models.data.datasets import Sample
from scripts.demo_quality import distance_matrix, gallery_quality, match_mark, true_match_rank
from service.client import ReidClient, SearchHit, metadata_for_samples

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def test_quality_over_http_equals_the_evaluator_on_the_vectors(live_server, redis_url, gallery_name, image_bytes,
                                                               tmp_path):
    samples = []
    for pid, color in enumerate(COLORS, 1):
        for cam in range(3):
            path = tmp_path / f"{pid:04d}_c{cam}.png"
            path.write_bytes(image_bytes(100 * pid + cam, color=color))
            samples.append(Sample(str(path), pid, cam))
    samples.append(Sample(samples[0].path, 1, 0))  # the same bytes twice: one image, counted once
    queries = samples[0:18:3]  # each person's camera-0 image, also in the gallery (same camera: ignored there)
    with ReidClient(live_server) as client:
        result = client.ingest(gallery_name, [s.path for s in samples], metadata_for_samples(samples))
        stored = [(item.id, samples[item.index]) for item in result.items]
        quality, answers = gallery_quality(client, gallery_name, queries, stored)
    assert quality.gallery == quality.ranked == 18 and quality.refine == "none"
    assert all(len(a) == 18 for a in answers)

    store = RedisStore(redis_url)
    ids = [i for i, _ in stored[:18]]
    gallery_vecs = store.get_vectors(gallery_name, ids)
    query_vecs = [gallery_vecs[samples.index(q)] for q in queries]
    want = evaluate_features(query_vecs, gallery_vecs, [q.pid for q in queries], [s.pid for s in samples[:18]],
                             [q.camid for q in queries], [s.camid for s in samples[:18]])
    got = quality.metrics
    assert got.mAP == pytest.approx(want.mAP, abs=1e-9) and got.cmc == pytest.approx(want.cmc, abs=1e-9)
    assert got.evaluated_queries == want.evaluated_queries == 6
    assert "rank-1" in quality.summary(6) and "mAP" in quality.summary(6) and "all 6 queries" in quality.summary(6)

    for q, hits in zip(queries, answers):
        rank = true_match_rank(hits, str(q.pid), str(q.camid))
        assert rank is not None
        hit = hits[rank - 1]
        assert hit.person_id == str(q.pid) and hit.camera_id != str(q.camid)
        assert match_mark(hit, str(q.pid), str(q.camid)) == "  <- true match"
        # nothing before it is a true match; the query's own image (same camera) is marked but not counted
        assert all(match_mark(h, str(q.pid), str(q.camid)) != "  <- true match" for h in hits[:rank - 1])
        assert match_mark(hits[0], str(q.pid), str(q.camid)).startswith("  <- same person, same camera")


def test_distance_matrix_keeps_the_answer_order_and_leaves_the_rest_last():
    hits = [SearchHit(id=7, score=0.9, cosine=0.9), SearchHit(id=3, score=0.9, cosine=0.9),
            SearchHit(id=99, score=0.1, cosine=0.1)]  # 99: not in the evaluated gallery
    d = distance_matrix([hits], [3, 5, 7])
    assert d.tolist() == [[1.0, float("inf"), 0.0]]  # tied scores keep the service's order
    assert true_match_rank([], "1", "0") is None
