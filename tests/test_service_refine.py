"""Search-time refinement over HTTP (real uvicorn, Redis, ONNX Runtime, FAISS): every mode answers exactly what
index/refine.py computes offline on the same vectors; batch search refines its queries together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from index.refine import NeighborTransformer, NFormerSpec, Refiner
from index.vector_index import VectorIndex
from service.client import ReidClient, ServiceError
from service.images import decode_image
from service.settings import RefineMode
from tests.test_service_http import assert_error, search, upload

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
N_GALLERY, TOP_K, K = 36, 8, 14


def gallery_blobs(image_bytes, n=N_GALLERY):
    """Images in colour groups (so neighbourhoods exist), cameras 0..2."""
    blobs = [(f"g{s}.png", image_bytes(s, color=COLORS[s % len(COLORS)])) for s in range(n)]
    meta = [{"camera_id": str(s % 3), "person_id": f"p{s % len(COLORS)}", "external_id": f"e{s}"}
            for s in range(n)]
    return blobs, meta


def query_blobs(image_bytes, n=3):
    return [(f"q{s}.png", image_bytes(1000 + s, color=COLORS[s % len(COLORS)])) for s in range(n)]


def batch(base, gallery, blobs, **form):
    files = [("files", (name, data, "image/png")) for name, data in blobs]
    return httpx.post(f"{base}/v1/galleries/{gallery}/search:batch", files=files, data=form, timeout=60)


def ok(r):
    assert r.status_code == 200, r.text
    return r.json()


class _Any:
    def __eq__(self, other):
        return True


ANY = _Any()  # equal to anything (timings)


class Offline:
    """The server's own vectors, refined offline by an independent Refiner on the bundle's nformer.onnx."""

    def __init__(self, server, gallery, bundle_dir):
        state = server.app.state.reid
        self.state = state
        self.ids, self.G = state.indexes[gallery].items()
        card = json.loads((bundle_dir / "model.json").read_text())
        self.refiner = Refiner(NeighborTransformer(bundle_dir / "nformer.onnx", NFormerSpec.from_card(card["nformer"]),
                                                   threads=1))

    def embed(self, blobs):
        return self.state.embedder.embed([decode_image(data) for _, data in blobs])

    def nformer_step(self, queries, candidates):
        """The bundle's NFormer over the queries then the candidates, called directly: refined rows, same order."""
        return self.refiner.nformer(np.concatenate([queries, candidates]))

    def topk(self, q, k):
        """Positions (in self.G) of the query's k nearest gallery vectors, best first."""
        return np.argsort(-(self.G @ q), kind="stable")[:k]

    def ranking(self, scores, positions, top_k=TOP_K):
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [int(self.ids[positions[j]]) for j in order], scores[order]


def check(results, expected_ids, expected_scores, cosines=None):
    assert [r["id"] for r in results] == expected_ids
    np.testing.assert_allclose([r["score"] for r in results], expected_scores, rtol=1e-5, atol=1e-5)
    if cosines is not None:
        np.testing.assert_allclose([r["cosine"] for r in results], cosines, rtol=1e-5, atol=1e-5)


@pytest.fixture
def nformer_server(server_factory, nformer_bundle, gallery_name, image_bytes):
    srv = server_factory(model_dir=nformer_bundle, refine_candidates=K)
    blobs, meta = gallery_blobs(image_bytes)
    assert upload(srv.url, gallery_name, blobs, metadata=json.dumps(meta)).status_code == 201
    return srv


def test_local_and_joint_match_offline_and_are_deterministic(nformer_server, nformer_bundle, gallery_name,
                                                             image_bytes):
    base, g = nformer_server.url, gallery_name
    off = Offline(nformer_server, g, nformer_bundle)
    assert len(off.ids) == N_GALLERY
    changed = False
    for name, data in query_blobs(image_bytes):
        q = off.embed([(name, data)])[0]

        # local: FAISS top-K, then NFormer over the query + those K candidates
        body = ok(search(base, g, data, top_k=TOP_K, refine="local"))
        assert body["refine"] == "local" and body["candidates"] == K and body["timing_ms"]["refine"] >= 0
        top = off.topk(q, K)
        scores = off.refiner.rerank("local", q[None], off.G[top])[0]
        ids, expected = off.ranking(scores, top)
        check(body["results"], ids, expected, cosines=[float(off.G[off.ids == i][0] @ q) for i in ids])
        changed |= not np.allclose([r["score"] for r in body["results"]], [r["cosine"] for r in body["results"]],
                                   atol=1e-3)
        assert ok(search(base, g, data, top_k=TOP_K, refine="local"))["results"] == body["results"]  # repeatable

        # a request's candidates override K
        body = ok(search(base, g, data, top_k=3, refine="local", candidates=5))
        assert body["candidates"] == 5
        top = off.topk(q, 5)
        check(body["results"], *off.ranking(off.refiner.rerank("local", q[None], off.G[top])[0], top, top_k=3))

        # joint: NFormer over the query + the whole gallery, in the index's order
        body = ok(search(base, g, data, top_k=TOP_K, refine="joint"))
        assert body["refine"] == "joint" and body["candidates"] is None
        everything = np.arange(len(off.ids))
        check(body["results"], *off.ranking(off.refiner.similarities("joint", q[None], off.G)[0], everything))
        assert ok(search(base, g, data, top_k=TOP_K, refine="joint"))["results"] == body["results"]

        # none: plain cosine, score == cosine, no refine timing
        body = ok(search(base, g, data, top_k=TOP_K, refine="none"))
        assert body["refine"] == "none" and body["candidates"] is None and "refine" not in body["timing_ms"]
        check(body["results"], *off.ranking(off.G @ q, everything))
        assert all(r["score"] == r["cosine"] for r in body["results"])
    assert changed, "the random NFormer should change the scores"

    metrics = httpx.get(f"{base}/metrics").text
    assert 'reid_refine_seconds_count{mode="local"} 9.0' in metrics
    assert 'reid_refine_seconds_count{mode="joint"} 6.0' in metrics
    assert 'mode="none"' not in metrics


def test_local_with_camera_filter_and_expansion(server_factory, nformer_bundle, gallery_name, image_bytes):
    srv = server_factory(model_dir=nformer_bundle, refine_candidates=3, refine_expand=3)
    base, g = srv.url, gallery_name
    blobs, meta = gallery_blobs(image_bytes)
    r = upload(base, g, blobs, metadata=json.dumps(meta))
    assert r.status_code == 201
    cam_of = {it["id"]: m["camera_id"] for it, m in zip(r.json()["items"], meta)}
    off = Offline(srv, g, nformer_bundle)
    name, data = query_blobs(image_bytes, 1)[0]
    q = off.embed([(name, data)])[0]

    body = ok(search(base, g, data, top_k=5, refine="local", exclude_camera_id="1"))
    assert len(body["results"]) == 5 and all(r["camera_id"] != "1" for r in body["results"])
    # offline: the 5 (top_k > K) nearest that pass the filter, then each one's 3 nearest neighbours (first seen,
    # filtered)
    pos_of = {int(i): p for p, i in enumerate(off.ids)}
    order = [p for p in off.topk(q, len(off.ids)) if cam_of[int(off.ids[p])] != "1"][:5]
    idx = srv.app.state.reid.indexes[g]
    _, nb = idx.search(off.G[order], 4)
    for i in nb.ravel():
        p = pos_of[int(i)]
        if p not in order and cam_of[int(i)] != "1":
            order.append(p)
    assert len(order) > 5, "the expansion adds candidates"
    scores = off.refiner.rerank("local", q[None], off.G[order])[0]
    check(body["results"], *off.ranking(scores, np.array(order), top_k=5))
    # local_kreciprocal refines the very same filtered, expanded candidates
    body = ok(search(base, g, data, top_k=5, refine="local_kreciprocal", exclude_camera_id="1"))
    assert body["candidates"] == 5 and body["candidates_used"] == 5
    scores = off.refiner.rerank("local_kreciprocal", q[None], off.G[order])[0]
    check(body["results"], *off.ranking(scores, np.array(order), top_k=5))


def test_batch_refines_queries_together(nformer_server, nformer_bundle, gallery_name, image_bytes):
    base, g = nformer_server.url, gallery_name
    off = Offline(nformer_server, g, nformer_bundle)
    queries = query_blobs(image_bytes, 3)
    Q = off.embed(queries)

    body = ok(batch(base, g, queries, top_k=TOP_K, refine="joint"))
    assert body["refine"] == "joint" and body["model"] == "tiny-nformer:0.0.1"
    assert [(x["index"], x["filename"]) for x in body["queries"]] == [(0, "q0.png"), (1, "q1.png"), (2, "q2.png")]
    assert set(body["timing_ms"]) == {"decode", "embed", "search", "refine", "total"}
    joint = off.refiner.similarities("joint", Q, off.G)
    for qi, answer in enumerate(body["queries"]):
        check(answer["results"], *off.ranking(joint[qi], np.arange(len(off.ids))))

    body = ok(batch(base, g, queries, top_k=TOP_K, refine="local"))
    assert body["refine"] == "local" and body["candidates"] == K
    union = []  # each query's K candidates, first seen first
    for q in Q:
        union += [p for p in off.topk(q, K) if p not in union]
    local = off.refiner.rerank("local", Q, off.G[union])
    for qi, answer in enumerate(body["queries"]):
        check(answer["results"], *off.ranking(local[qi], np.array(union)))
    assert ok(batch(base, g, queries, top_k=TOP_K, refine="local")) == {**body, "timing_ms": ANY}

    # refined together != refined alone
    alone = [ok(search(base, g, data, top_k=TOP_K, refine="local"))["results"] for _, data in queries]
    assert any(not np.allclose([r["score"] for r in a], [r["score"] for r in b["results"]], atol=1e-6)
               or [r["id"] for r in a] != [r["id"] for r in b["results"]] for a, b in zip(alone, body["queries"]))
    # none: each query's plain search
    body = ok(batch(base, g, queries, top_k=TOP_K, refine="none"))
    assert "refine" not in body["timing_ms"]
    for (_, data), answer in zip(queries, body["queries"]):
        plain = ok(search(base, g, data, top_k=TOP_K))["results"]
        assert [r["id"] for r in answer["results"]] == [r["id"] for r in plain]

    with ReidClient(base) as client:  # the client speaks both
        got = client.search_batch(g, [data for _, data in queries], top_k=4, refine="local", candidates=5)
        assert len(got.queries) == 3 and got.candidates == 5
        one = client.search(g, queries[0][1], top_k=4, refine="joint")
        assert one.refine == "joint" and len(one.results) == 4


def test_local_kreciprocal_matches_offline(nformer_server, nformer_bundle, gallery_name, image_bytes):
    """k-reciprocal re-ranking of the NFormer-refined candidates: a search answers what `reid evaluate`
    measures (the offline Refiner's ranking of the whole gallery); a batch refines its queries together, as
    local does, then re-ranks each query on its own candidates."""
    base, g = nformer_server.url, gallery_name
    off = Offline(nformer_server, g, nformer_bundle)
    queries = query_blobs(image_bytes, 3)
    Q = off.embed(queries)
    offline = off.refiner.with_candidates(K).similarities("local_kreciprocal", Q, off.G)
    local = off.refiner.with_candidates(K).similarities("local", Q, off.G)
    kreciprocal = off.refiner.with_candidates(K).similarities("kreciprocal", Q, off.G)
    everything = np.arange(len(off.ids))
    # what makes this check bite: the combination answers neither what kreciprocal nor what local does
    assert not np.allclose(offline, kreciprocal, atol=1e-3)
    assert any(off.ranking(a, everything)[0] != off.ranking(b, everything)[0] for a, b in zip(offline, local))
    for qi, (_, data) in enumerate(queries):
        body = ok(search(base, g, data, top_k=TOP_K, refine="local_kreciprocal"))
        assert (body["refine"], body["refine_applied"]) == ("local_kreciprocal", "local_kreciprocal")
        assert body["candidates"] == K and body["candidates_used"] == K and body["timing_ms"]["refine"] >= 0
        ids, expected = off.ranking(offline[qi], everything)
        check(body["results"], ids, expected, cosines=[float(off.G[off.ids == i][0] @ Q[qi]) for i in ids])
        assert ok(search(base, g, data, top_k=TOP_K, refine="local_kreciprocal")) == {**body, "timing_ms": ANY}

    body = ok(batch(base, g, queries, top_k=TOP_K, refine="local_kreciprocal"))
    assert body["refine"] == "local_kreciprocal" and body["candidates"] == K
    union, own = [], []  # each query's K candidates, first seen first; and each query's own in the union
    for q in Q:
        top = off.topk(q, K)
        union += [p for p in top if p not in union]
        own.append([union.index(p) for p in top])
    refined = off.nformer_step(Q, off.G[union])
    for qi, answer in enumerate(body["queries"]):
        scores = off.refiner.rerank("kreciprocal", refined[qi:qi + 1], refined[len(Q):][own[qi]])[0]
        check(answer["results"], *off.ranking(scores, np.array(union)[own[qi]]))
    metrics = httpx.get(f"{base}/metrics").text
    assert 'reid_refine_seconds_count{mode="local_kreciprocal"} 7.0' in metrics


def test_batch_errors_and_route(server_factory, nformer_bundle, gallery_name, image_bytes):
    srv = server_factory(model_dir=nformer_bundle, max_batch_queries=2, joint_max_gallery=3)
    base, g = srv.url, gallery_name
    blobs, meta = gallery_blobs(image_bytes, 5)
    assert upload(base, g, blobs, metadata=json.dumps(meta)).status_code == 201
    queries = query_blobs(image_bytes, 3)
    # ":batch" is its own route: the gallery parameter does not swallow it, GET is not allowed
    body = ok(batch(base, g, queries[:2], top_k=2))  # no refine field: the default, auto; 5 images: none runs
    assert len(body["queries"]) == 2 and body["refine"] == "auto" and body["refine_applied"] == "none"
    assert_error(batch(base, "nope-" + g, queries[:1]), 404, "gallery_not_found")
    assert httpx.get(f"{base}/v1/galleries/{g}/search:batch").status_code == 405
    assert_error(httpx.post(f"{base}/v1/galleries/{g}:batch/search", files={"file": ("q.png", queries[0][1])}),
                 404, "gallery_not_found")
    # limits and bad input: a clear JSON error, nothing partial
    assert_error(batch(base, g, queries), 413, "too_many_queries")
    assert_error(httpx.post(f"{base}/v1/galleries/{g}/search:batch", data={"top_k": "2"}), 422, "validation_error")
    r = batch(base, g, [queries[0], ("notes.txt", b"plain text")])
    body = assert_error(r, 415, "unsupported_media_type")
    assert "notes.txt" in body["error"]["message"] and body["index"] == 1 and body["filename"] == "notes.txt"
    body = assert_error(batch(base, g, [("empty.png", b"")]), 422, "empty_file")
    assert "empty.png" in body["error"]["message"] and body["index"] == 0
    assert_error(batch(base, g, queries[:2], refine="nope"), 422, "unsupported_refine")
    # joint refuses galleries over joint_max_gallery, and says what to use instead
    for r in (batch(base, g, queries[:2], refine="joint"), search(base, g, queries[0][1], refine="joint")):
        assert "refine=local" in assert_error(r, 422, "gallery_too_large_for_joint")["error"]["message"]
    assert ok(search(base, g, queries[0][1], refine="local", top_k=2))["refine"] == "local"
    for bad in ("0", "2001"):
        assert_error(search(base, g, queries[0][1], refine="local", candidates=bad), 422, "invalid_candidates")
    assert_error(search(base, g, queries[0][1], refine="Local"), 422, "unsupported_refine")


def test_model_card_and_default_mode(server_factory, nformer_bundle, gallery_name, image_bytes):
    srv = server_factory(model_dir=nformer_bundle, refine_default="local")
    card = httpx.get(f"{srv.url}/v1/model").json()
    assert card["nformer"]["topk"] == 5 and card["nformer"]["layers"] == 2 and "nformer.onnx" in card["files"]
    assert upload(srv.url, gallery_name, gallery_blobs(image_bytes, 4)[0]).status_code == 201
    body = ok(search(srv.url, gallery_name, image_bytes(1)))  # no refine field: the configured default
    assert body["refine"] == "local" and body["candidates"] == 200
    assert ok(search(srv.url, gallery_name, image_bytes(1), refine="none"))["refine"] == "none"
    assert srv.app.state.reid.has_nformer
    page = httpx.get(f"{srv.url}/").text  # the web page offers the modes
    assert '<select id="refine">' in page and all(f'value="{m.value}"' in page for m in RefineMode)


def test_bundle_without_nformer(server_factory, gallery_name, image_bytes):
    srv = server_factory(refine_default="local")  # the tiny bundle: no nformer.onnx
    base, g = srv.url, gallery_name
    assert not srv.app.state.reid.has_nformer and "nformer" not in httpx.get(f"{base}/v1/model").json()
    assert upload(base, g, gallery_blobs(image_bytes, 6)[0]).status_code == 201
    # a default the bundle cannot honour falls back to none (logged) instead of failing every search
    assert ok(search(base, g, image_bytes(1)))["refine"] == "none"
    for mode in ("local", "joint", "local_kreciprocal"):
        msg = assert_error(search(base, g, image_bytes(1), refine=mode), 422, "refine_unavailable")["error"]["message"]
        assert "nformer.onnx" in msg and "none" in msg
        assert_error(batch(base, g, [("q.png", image_bytes(1))], refine=mode), 422, "refine_unavailable")
    with ReidClient(base) as client, pytest.raises(ServiceError) as e:
        client.search(g, image_bytes(1), refine="local")
    assert e.value.status == 422


def test_kreciprocal_matches_offline(server_factory, nformer_bundle, gallery_name, image_bytes):
    pytest.importorskip("index.rerank", reason="index/rerank.py (k_reciprocal_rerank) is not there yet")
    for bundle in (nformer_bundle, None):  # kreciprocal needs no NFormer
        srv = server_factory(**({"model_dir": bundle} if bundle else {}), refine_candidates=K)
        g = f"{gallery_name}-{'n' if bundle else 'plain'}"
        blobs, meta = gallery_blobs(image_bytes)
        assert upload(srv.url, g, blobs, metadata=json.dumps(meta)).status_code == 201
        state = srv.app.state.reid
        ids, G = state.indexes[g].items()
        queries = query_blobs(image_bytes, 2)
        Q = state.embedder.embed([decode_image(d) for _, d in queries])
        refiner = Refiner()
        body = ok(batch(srv.url, g, queries, top_k=TOP_K, refine="kreciprocal"))
        assert body["refine"] == "kreciprocal" and body["candidates"] == K
        for q, (_, data), answer in zip(Q, queries, body["queries"]):
            top = np.argsort(-(G @ q), kind="stable")[:K]
            scores = refiner.rerank("kreciprocal", q[None], G[top])[0]
            order = np.argsort(-scores, kind="stable")[:TOP_K]
            check(answer["results"], [int(ids[top[j]]) for j in order], scores[order])
            single = ok(search(srv.url, g, data, top_k=TOP_K, refine="kreciprocal"))
            assert single["results"] == answer["results"]  # per query on its own candidates, batch or not


def test_vector_index_vectors_and_items():
    idx = VectorIndex(4)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    idx.add([10, 20, 30, 40, 50], x)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    vecs, found = idx.vectors([30, 10])
    np.testing.assert_allclose(vecs, xn[[2, 0]], rtol=1e-6)
    assert found.all()
    idx.remove([20])
    vecs, found = idx.vectors([40, 20, 10])
    assert list(found) == [True, False, True] and not vecs[1].any()
    np.testing.assert_allclose(vecs[[0, 2]], xn[[3, 0]], rtol=1e-6)
    ids, all_vecs = idx.items()
    assert list(ids) == [10, 30, 40, 50]
    np.testing.assert_allclose(all_vecs, xn[[0, 2, 3, 4]], rtol=1e-6)
    assert VectorIndex(4).items()[1].shape == (0, 4) and VectorIndex(4).vectors([])[0].shape == (0, 4)


def test_settings_validate_refine_default():
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="refine_default"):
        Settings(refine_default="nformer")
    with pytest.raises(ValidationError):
        Settings(refine_candidates=0)


def test_refine_mode_is_the_refiners_modes_plus_auto():
    from index.refine import MODES
    from service.settings import RefineMode

    assert [m.value for m in RefineMode] == [*MODES, "auto"]
    assert [m for m in RefineMode if m.needs_nformer] == [RefineMode.joint, RefineMode.local,
                                                          RefineMode.local_kreciprocal]
    assert [m for m in RefineMode if m.refines_candidates] == [RefineMode.local, RefineMode.kreciprocal,
                                                               RefineMode.local_kreciprocal]


def test_service_never_imports_torch():
    code = ("import sys, service.app, service.state, service.routes.search, index.refine, index.vector_index; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'models'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
