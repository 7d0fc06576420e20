"""Refinement building blocks: neighbour search, landmarks, nformer.onnx vs torch, the modes' contracts,
and the exact joint neighbours from a cached gallery graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from index.refine import (NeighborTransformer, NFormerSpec, Refiner, expand_candidates, sample_landmarks,
                          topk_neighbors)
from models.export import export_nformer
from models.nformer import ExportableNFormer, NFormer, NFormerConfig
from models.nformer import topk_neighbors as torch_topk_neighbors
from models.refine_eval import gallery_graph, joint_neighbors


def clustered(n, dim=32, seed=0, noise=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 6), dim))
    x = centres[rng.integers(len(centres), size=n)] + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def nformer_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = NFormer(NFormerConfig(dim=32, heads=2, layers=2, topk=6, landmarks=3, dropout=0.0))
    with torch.no_grad():  # leave the near-identity init so refinement visibly changes rankings
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.eval()
    path = tmp_path_factory.mktemp("nformer") / "nformer.onnx"
    export_nformer(model, path)
    spec = NFormerSpec(dim=32, layers=2, landmarks=3, topk=6)
    return model, NeighborTransformer(path, spec, threads=1)


def test_topk_neighbors_match_torch():
    x = clustered(300)
    ours, sims = topk_neighbors(x, 10, with_similarities=True)
    assert ours.shape == (300, 10) and (ours[:, 0] == np.arange(300)).all()  # itself first
    np.testing.assert_allclose(sims, np.take_along_axis(x @ x.T, ours, axis=1), rtol=1e-5, atol=1e-6)
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # best first
    theirs = torch_topk_neighbors(torch.from_numpy(x)[None], 10)[0].numpy()
    assert all(set(a) == set(b) for a, b in zip(ours, theirs))
    assert topk_neighbors(x[:4], 10).shape == (4, 4)  # N < k


def test_landmarks_are_distinct_repeatable_and_capped_by_n():
    a, b = sample_landmarks(100, 4, 5, seed=3), sample_landmarks(100, 4, 5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 5) and all(len(set(row)) == 5 for row in a)
    assert not np.array_equal(a, sample_landmarks(100, 4, 5, seed=4))
    assert sample_landmarks(3, 2, 5).shape == (2, 3)


@pytest.mark.parametrize("n", [1, 4, 6, 50, 257])
def test_onnx_runtime_matches_torch_at_any_n(nformer_onnx, n):
    model, onnx = nformer_onnx
    x = clustered(n, seed=n)
    got = onnx(x)
    with torch.no_grad():
        landmarks = torch.from_numpy(sample_landmarks(n, 2, 3))
        expected = torch.nn.functional.normalize(model(torch.from_numpy(x)[None], landmarks=landmarks)[0], dim=-1)
        dense = torch.nn.functional.normalize(model(torch.from_numpy(x)[None], landmarks=landmarks, dense=True)[0], dim=-1)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, dense.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_modes_keep_their_contracts(nformer_onnx):
    _, onnx = nformer_onnx
    x = clustered(120, seed=5)
    query, gallery = x[:6], x[6:]
    refiner = Refiner(onnx, candidates=20)
    cosine = query @ gallery.T
    np.testing.assert_allclose(refiner.similarities("none", query, gallery), cosine, rtol=1e-6, atol=1e-6)
    joint = refiner.similarities("joint", query, gallery)
    refined = onnx(np.concatenate([query, gallery]))
    np.testing.assert_allclose(joint, refined[:6] @ refined[6:].T, rtol=1e-5, atol=1e-6)
    assert not np.allclose(joint, cosine, atol=1e-3), "refinement changes the scores"
    local = refiner.similarities("local", query, gallery)
    for qi in range(6):
        top20 = np.argsort(-cosine[qi])[:20]
        ranked = np.argsort(-local[qi])
        assert set(ranked[:20]) == set(top20), "local re-orders the K candidates and only them"
        # candidates in cosine order: landmarks are token positions, so the order is part of the input
        expected = refiner.rerank("local", query[qi:qi + 1], gallery[top20])[0]
        np.testing.assert_allclose(local[qi, top20], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(local, refiner.similarities("local", query, gallery))  # repeatable
    with pytest.raises(ValueError, match="nformer"):
        Refiner(None).similarities("joint", query, gallery)
    with pytest.raises(ValueError, match="unknown refine mode"):
        refiner.similarities("bogus", query, gallery)


def test_local_kreciprocal_is_kreciprocal_on_the_nformer_refined_candidates(nformer_onnx):
    """Step by step, without the Refiner: local's candidates (the K nearest by cosine, then each one's nearest
    gallery neighbours), NFormer over the query and them, then the reference k-reciprocal re-ranking of the
    refined features."""
    from index.rerank import k_reciprocal_rerank_dense

    _, onnx = nformer_onnx
    x = clustered(150, seed=7)
    query, gallery = x[:5], x[5:]
    k, expand = 20, 2
    refiner = Refiner(onnx, candidates=k, expand=expand)
    combined = refiner.similarities("local_kreciprocal", query, gallery)
    local = refiner.similarities("local", query, gallery)
    kreciprocal = refiner.similarities("kreciprocal", query, gallery)
    cosine = query @ gallery.T
    for qi in range(len(query)):
        order = list(np.argsort(-cosine[qi], kind="stable")[:k])
        for c in order[:k]:  # each candidate's own nearest (itself first), unseen ones appended in order
            order += [n for n in np.argsort(-(gallery @ gallery[c]), kind="stable")[:expand + 1] if n not in order]
        assert len(order) > k, "the expansion adds candidates"
        refined = onnx(np.concatenate([query[qi:qi + 1], gallery[order]]))
        expected = 1.0 - k_reciprocal_rerank_dense(refined[:1], refined[1:], 20, 6, 0.3, v_dtype=np.float64)[0]
        np.testing.assert_allclose(combined[qi, order], expected, rtol=1e-5, atol=1e-5)
        outside = np.setdiff1d(np.arange(len(gallery)), order)
        np.testing.assert_allclose(combined[qi, outside], cosine[qi, outside] - 10.0, atol=1e-6)
        assert set(np.flatnonzero(local[qi] > -5)) == set(order)  # the same candidates as local
    # neither part alone: the NFormer moves k-reciprocal's scores, k-reciprocal re-ranks local's refined ones
    assert not np.allclose(combined, kreciprocal, atol=1e-3) and not np.allclose(combined, local, atol=1e-3)
    with pytest.raises(ValueError, match="nformer"):
        Refiner(None).rerank("local_kreciprocal", query[:1], gallery[:10])


def test_candidates_expand_by_new_neighbours_in_first_seen_order():
    top = np.array([5, 2], dtype=np.int64)
    nearest = {3: np.array([[5, 9, 2], [2, 7, 9]]), 2: np.array([[5, -1], [2, 7]])}  # FAISS pads with -1
    assert expand_candidates(top, 0, nearest.__getitem__) is top  # expansion off: the K as they are
    assert expand_candidates(top, 2, nearest.__getitem__).tolist() == [5, 2, 9, 7]
    assert expand_candidates(top, 1, nearest.__getitem__).tolist() == [5, 2, 7]


def test_joint_neighbors_from_a_cached_gallery_graph_are_exact():
    x = clustered(400, seed=9)
    query, gallery = x[:5], x[5:]
    fast = joint_neighbors(query, gallery, gallery_graph(gallery, 8), 8)
    exact = topk_neighbors(x, 8)
    assert all(set(a) == set(b) for a, b in zip(fast, exact))
