"""Online equals offline: the PRID2011 split-0 protocol through the HTTP API (real uvicorn, real Redis,
the bundled model) gives the same rank-1 and mAP as `reid evaluate` on the same split, and the refined
modes rank as `reid evaluate --refine` does (one code path: index/refine.py over nformer.onnx)."""

import numpy as np
import pytest

from index.metrics import evaluate_rankings
from models.data.datasets import load_dataset
from models.evaluate import BundleEncoder, embed_protocol, evaluate_bundle
from models.refine_eval import bundle_refiner
from service.client import ReidClient, metadata_for_samples
from service.settings import DEFAULT_BUNDLE_DIR
from tests.shared_data import require_shared_data


@pytest.fixture(scope="module")
def prid2011():
    require_shared_data()
    return load_dataset("prid2011", 0)


def test_http_search_reproduces_offline_evaluation(prid2011, server_factory):
    offline = evaluate_bundle(DEFAULT_BUNDLE_DIR, prid2011)

    # fp32 refinement on both sides: the int8 NFormer quantises activations per call, so features that differ in
    # the 7th digit (a query embedded alone vs in a batch) may round apart and swap near-ties; its fidelity is
    # tests/test_nformer_int8.py's and the bench's accuracy section's to show
    server = server_factory(model_dir=DEFAULT_BUNDLE_DIR, ort_threads=0, max_batch_queries=100,
                            refine_precision="fp32")
    gallery = prid2011.gallery
    with ReidClient(server.url) as client:
        ingested = client.ingest("prid2011", [s.path for s in gallery], metadata_for_samples(gallery))
        assert not ingested.errors and len(ingested.items) == len(gallery) == 649
        assert client.gallery("prid2011").count == 649
        column = {item.id: i for i, item in enumerate(ingested.items)}
        distmat = np.full((len(prid2011.query), len(gallery)), np.inf)
        for row, query in enumerate(prid2011.query):
            answer = client.search("prid2011", query.path, top_k=len(gallery))
            assert len(answer.results) == len(gallery)
            for result in answer.results:
                distmat[row, column[result.id]] = 1.0 - result.score
        local, local_kreciprocal = ([[column[r.id] for r in client.search("prid2011", q.path, top_k=50, refine=mode,
                                                                          candidates=50).results]
                                     for q in prid2011.query] for mode in ("local", "local_kreciprocal"))
        joint = client.search_batch("prid2011", [q.path for q in prid2011.query], top_k=10, refine="joint")

    online = evaluate_rankings(distmat, np.array([s.pid for s in prid2011.query]), np.array([s.pid for s in gallery]),
                               np.array([s.camid for s in prid2011.query]), np.array([s.camid for s in gallery]))
    assert online.evaluated_queries == offline.evaluated_queries == 100
    assert abs(online.ranks["rank1"] - offline.ranks["rank1"]) <= 0.001
    assert abs(online.mAP - offline.mAP) <= 0.001
    assert offline.ranks["rank1"] > 0.05  # a trained model, far above the 1/649 of chance

    # the refined modes: the same rankings as the offline evaluation's code path
    q, g = embed_protocol(BundleEncoder(DEFAULT_BUNDLE_DIR), prid2011)
    refiner = bundle_refiner(DEFAULT_BUNDLE_DIR, precision="fp32")
    offline_local, offline_local_kreciprocal = (
        np.argsort(-refiner.with_candidates(50).similarities(mode, q, g), axis=1)[:, :50]
        for mode in ("local", "local_kreciprocal"))
    # the service puts the gallery in id order for joint (landmarks are positions): the same here
    by_id = np.argsort([item.id for item in ingested.items])
    offline_joint = by_id[np.argsort(-refiner.similarities("joint", q, g[by_id]), axis=1)[:, :10]]
    online_joint = [[column[r.id] for r in answer.results] for answer in joint.queries]
    assert np.mean([a[0] == b[0] for a, b in zip(local, offline_local)]) >= 0.99
    assert np.mean([a[:10] == list(b[:10]) for a, b in zip(local, offline_local)]) >= 0.95
    assert np.mean([a[0] == b[0] for a, b in zip(local_kreciprocal, offline_local_kreciprocal)]) >= 0.99
    assert np.mean([a[:10] == list(b[:10]) for a, b in zip(local_kreciprocal, offline_local_kreciprocal)]) >= 0.95
    assert local_kreciprocal != local  # a ranking of its own
    assert np.mean([a[0] == b[0] for a, b in zip(online_joint, offline_joint)]) >= 0.99
