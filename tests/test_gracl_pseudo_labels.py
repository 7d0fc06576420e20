"""Tests for models.gracl.pseudo_labels: sparse k-reciprocal Jaccard distance, sparse DBSCAN, cluster stats."""

from __future__ import annotations

import time

import numpy as np
import pytest

from models.gracl.pseudo_labels import ClusterStats, cluster_stats, dbscan, jaccard_neighbors, pseudo_labels


def _toy(clusters=12, size=10, dim=32, spread=0.15, seed=0):
    """`clusters` tight groups of `size` unit vectors around random unit centres, with their true ids."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ids = np.repeat(np.arange(clusters), size)
    feats = centres[ids] + spread * rng.standard_normal((len(ids), dim)) / np.sqrt(dim)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats.astype(np.float32), ids


def _dense(indptr, indices, distances, n):
    out = np.ones((n, n))
    out[np.repeat(np.arange(n), np.diff(indptr)), indices] = distances
    return out


def _reference_jaccard(feats, k1, k2):
    """Dense, loop-by-loop port of cluster-contrast's `compute_jaccard_distance` (faiss_rerank.py), the
    distance the training recipe clusters. `index.rerank.k_reciprocal_rerank(_dense)` is not a usable
    reference: it ranks k1+1 neighbours, divides distances by the row maximum (the published re-ranking),
    and treats query and gallery as distinct points, whereas cluster-contrast ranks k1 neighbours (its faiss
    search returns k1 columns, so `initial_rank[i, :k1+1]` has k1) and weights by a plain softmax(-d).
    The ranking is a full float64 argsort here, independent of the faiss search under test."""
    n = len(feats)
    f = feats.astype(np.float64)
    dist = np.maximum(2 - 2 * f @ f.T, 0)
    np.fill_diagonal(dist, 0)
    initial_rank = np.argsort(dist, axis=1, kind="stable")[:, :k1]

    def reciprocal(i, k):
        forward = initial_rank[i, :k + 1]
        backward = initial_rank[forward, :k + 1]
        return forward[np.where(backward == i)[0]]

    half = int(np.around(k1 / 2))
    V = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = r
        for cand in r:
            cand_set = reciprocal(cand, half)
            if len(np.intersect1d(cand_set, r)) > 2 / 3 * len(cand_set):
                expanded = np.append(expanded, cand_set)
        expanded = np.unique(expanded)
        w = np.exp(-dist[i, expanded])
        V[i, expanded] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[initial_rank[i, :k2]].mean(axis=0) for i in range(n)])
    m = np.minimum(V[:, None, :], V[None, :, :]).sum(axis=2)
    return np.maximum(1 - m / (2 - m), 0)


# ------------------------------------------------------------------------------------------------ Jaccard


@pytest.mark.parametrize("k1,k2", [(30, 6), (10, 3), (7, 1)])
def test_jaccard_matches_dense_reference(k1, k2):
    feats, ids = _toy()
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((8, feats.shape[1])).astype(np.float32)  # a few unclustered points too
    feats = np.concatenate([feats, noise / np.linalg.norm(noise, axis=1, keepdims=True)])
    n = len(feats)
    indptr, indices, distances = jaccard_neighbors(feats, k1, k2)
    assert indptr.shape == (n + 1,) and indptr[-1] == len(indices) == len(distances)
    assert np.all(distances < 1) and np.all(distances >= 0)
    for i in range(n):  # rows sorted, self listed at distance 0
        row = indices[indptr[i]:indptr[i + 1]]
        assert np.all(np.diff(row) > 0) and i in row
    sparse = _dense(indptr, indices, distances, n)
    reference = _reference_jaccard(feats, k1, k2)
    np.testing.assert_allclose(sparse, reference, atol=1e-5)
    assert np.array_equal(sparse, sparse.T)  # exact symmetry, DBSCAN's neighbourhoods rely on it
    # exactly the pairs with reference distance < 1 are listed
    assert np.array_equal(sparse < 1, reference < 1 - 1e-9)


def test_jaccard_separates_clusters():
    feats, ids = _toy()
    sparse = _dense(*jaccard_neighbors(feats), len(feats))
    same = ids[:, None] == ids[None, :]
    off_diag = ~np.eye(len(ids), dtype=bool)
    assert sparse[same & off_diag].max() < 0.5
    assert np.median(sparse[~same]) > 0.95 and sparse[~same].min() > sparse[same & off_diag].max()


def test_jaccard_tiny_inputs():
    indptr, indices, distances = jaccard_neighbors(np.zeros((0, 8), np.float32))
    assert indptr.tolist() == [0] and len(indices) == len(distances) == 0
    feats, _ = _toy(clusters=1, size=3)  # fewer points than k1
    indptr, indices, distances = jaccard_neighbors(feats)
    np.testing.assert_allclose(_dense(indptr, indices, distances, 3), _reference_jaccard(feats, 30, 6), atol=1e-6)


def test_jaccard_speed_sanity_n2000():
    feats = np.random.default_rng(3).standard_normal((2000, 64)).astype(np.float32)
    start = time.perf_counter()
    indptr, indices, distances = jaccard_neighbors(feats, max_distance=0.6)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, elapsed
    # unstructured data: without max_distance nearly all N^2 pairs share an entry (see the docstring);
    # within eps only a few pairs beyond the diagonal are left
    assert len(indices) < 4 * 2000 and np.all(distances <= 0.6)


def test_jaccard_max_distance_filters_exactly():
    feats, _ = _toy()
    full = _dense(*jaccard_neighbors(feats), len(feats))
    indptr, indices, distances = jaccard_neighbors(feats, max_distance=0.3)
    cut = _dense(indptr, indices, distances, len(feats))
    assert np.array_equal(cut, np.where(full <= 0.3, full, 1.0))


# ------------------------------------------------------------------------------------------------- DBSCAN


def _reference_dbscan(dist, eps, min_samples):
    """Textbook DBSCAN on a dense matrix, written like sklearn's dbscan_inner: expand clusters by a stack
    from each still-unlabelled core point in index order."""
    n = len(dist)
    neighbourhoods = [np.flatnonzero((dist[i] <= eps) | (np.arange(n) == i)) for i in range(n)]
    core = np.array([len(nb) >= min_samples for nb in neighbourhoods])
    labels = np.full(n, -1)
    label = 0
    for i in range(n):
        if labels[i] != -1 or not core[i]:
            continue
        stack = [i]
        while stack:
            p = stack.pop()
            if labels[p] != -1:
                continue
            labels[p] = label
            if core[p]:
                stack.extend(q for q in neighbourhoods[p] if labels[q] == -1)
        label += 1
    return labels


def _random_graph(rng, n, density):
    """Symmetric random distances in [0, 1); pairs left out (distance 1) with probability 1 - density."""
    d = rng.random((n, n))
    d = np.minimum(d, d.T)
    keep = rng.random((n, n)) < density
    keep = keep & keep.T
    np.fill_diagonal(d, 0)
    np.fill_diagonal(keep, rng.random(n) < 0.5)  # self listed or not: must not matter
    rows, cols = np.nonzero(keep)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    dense = np.ones((n, n))
    dense[rows, cols] = d[rows, cols]
    np.fill_diagonal(dense, 0)
    return (indptr, cols, d[rows, cols].astype(np.float32)), dense


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eps,min_samples", [(0.2, 2), (0.3, 3), (0.5, 4), (0.6, 5), (0.1, 1)])
def test_dbscan_matches_reference(seed, eps, min_samples):
    rng = np.random.default_rng(seed)
    csr, dense = _random_graph(rng, n=int(rng.integers(20, 80)), density=float(rng.uniform(0.05, 0.3)))
    labels = dbscan(*csr, eps=eps, min_samples=min_samples)
    expected = _reference_dbscan(dense, eps, min_samples)
    # the reference numbers clusters like sklearn, so labels match exactly, not only up to permutation
    assert np.array_equal(labels, expected)


def test_dbscan_labels_border_and_noise():
    # chain 0-1-2-3 of core points (min_samples=2), 4 a border point of 3, 5 isolated
    pairs = {(0, 1): 0.1, (1, 2): 0.1, (2, 3): 0.1, (3, 4): 0.5, (4, 5): 0.9}
    n = 6
    dense = np.ones((n, n))
    for (i, j), d in pairs.items():
        dense[i, j] = dense[j, i] = d
    rows, cols = np.nonzero(dense < 1)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    labels = dbscan(indptr, cols, dense[rows, cols], eps=0.5, min_samples=3)
    # 0 has 2 neighbours (itself, 1): border; 1, 2, 3 core; 4 border of 3; 5 noise
    assert labels.tolist() == [0, 0, 0, 0, 0, -1]
    assert dbscan(indptr, cols, dense[rows, cols], eps=0.05, min_samples=1).tolist() == list(range(6))
    assert dbscan(np.zeros(1, np.int64), np.zeros(0), np.zeros(0)).tolist() == []


# -------------------------------------------------------------------------------------------- end to end


def test_pseudo_labels_recover_clusters():
    feats, ids = _toy()
    labels = pseudo_labels(feats)
    stats = cluster_stats(labels, ids)
    assert stats.clusters == 12 and stats.outliers == 0 and stats.largest == 10
    assert stats.nmi > 0.95 and stats.pairwise_precision > 0.95 and stats.pairwise_recall > 0.95
    with pytest.raises(ValueError):
        pseudo_labels(feats, eps=1.0)


def test_pseudo_labels_far_points_do_not_disturb_clusters():
    # Clusters live in dims 0-15, six far points each on its own axis of dims 16-31 (nearly orthogonal to
    # everything). Such an isolated point does NOT become -1 with k2=6: its k2 nearest come from one
    # cluster, query expansion hands it that cluster's encoding, and DBSCAN attaches it as a border point
    # (cluster-contrast behaves identically). What must hold: no new cluster, no merge, clusters intact.
    feats, ids = _toy(dim=16)
    feats = np.concatenate([feats, np.zeros_like(feats)], axis=1)
    far = np.zeros((6, 32), np.float32)
    far[np.arange(6), 16 + np.arange(6)] = 1
    far[:, :16] = 0.05 * np.random.default_rng(0).standard_normal((6, 16))
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    labels = pseudo_labels(np.concatenate([feats, far]))
    stats = cluster_stats(labels[:len(feats)], ids)
    assert stats.clusters == 12 and stats.outliers == 0 and stats.nmi == pytest.approx(1.0)
    assert set(labels[len(feats):].tolist()) <= set(range(12)) | {-1}


def test_pseudo_labels_drop_points_in_a_diffuse_background():
    # Outliers that DBSCAN does drop: a background of random directions, too spread to be dense anywhere.
    feats, ids = _toy()
    background = np.random.default_rng(1).standard_normal((200, feats.shape[1]))
    background /= np.linalg.norm(background, axis=1, keepdims=True)
    labels = pseudo_labels(np.concatenate([feats, background.astype(np.float32)]))
    assert (labels[len(feats):] == -1).mean() > 0.5
    assert cluster_stats(labels[:len(feats)], ids).nmi > 0.95


# ---------------------------------------------------------------------------------------------- statistics


def test_cluster_stats_identical_partitions():
    true = np.array([3, 3, 5, 5, 5, 9])
    stats = cluster_stats(np.array([0, 0, 1, 1, 1, 2]), true)
    assert (stats.clusters, stats.outliers, stats.largest) == (3, 0, 3)
    assert stats.nmi == pytest.approx(1.0) and stats.ari == pytest.approx(1.0)
    assert stats.pairwise_precision == 1.0 and stats.pairwise_recall == 1.0


def test_cluster_stats_hand_checked():
    # true {a,b},{c,d}; pred {a,b},{c},{d}. Pairs (of 6): same in both 1, same in true 2, same in pred 1.
    # ARI = (1 - 2*1/6) / ((2+1)/2 - 2*1/6) = (2/3) / (7/6) = 4/7 (sklearn's docs give 0.57 for this case).
    # NMI: H(true) = ln 2, H(pred) = 1.5 ln 2, MI = ln 2 (pred determines true) -> ln2 / 1.25 ln2 = 0.8.
    stats = cluster_stats(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1]))
    assert stats.ari == pytest.approx(4 / 7) and stats.nmi == pytest.approx(0.8)
    assert stats.pairwise_precision == 1.0 and stats.pairwise_recall == 0.5
    # true {0,1,2},{3,4,5}; pred {0,1},{2,3},{4,5}: cells 2,1,1,2 -> 2 shared pairs; true pairs 6, pred 3,
    # all 15. expected = 6*3/15 = 1.2, max = 4.5 -> ARI = 0.8/3.3 = 8/33. precision 2/3, recall 2/6.
    stats = cluster_stats(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 0, 1, 1, 1]))
    assert stats.ari == pytest.approx(8 / 33)
    assert stats.pairwise_precision == pytest.approx(2 / 3) and stats.pairwise_recall == pytest.approx(1 / 3)


def test_cluster_stats_outliers_are_singletons():
    # outliers -> singletons: [-1,-1,0,0] scores as {a},{b},{c,d} against {a,b},{c,d}, i.e. as the 4/7 case
    stats = cluster_stats(np.array([-1, -1, 0, 0]), np.array([0, 0, 1, 1]))
    assert (stats.clusters, stats.outliers, stats.outlier_share, stats.largest) == (1, 2, 0.5, 2)
    assert stats.ari == pytest.approx(4 / 7) and stats.nmi == pytest.approx(0.8)
    # pair precision / recall skip the outliers: only the pair (c, d) is left, correct and found
    assert stats.pairwise_precision == 1.0 and stats.pairwise_recall == 1.0
    all_noise = cluster_stats(np.full(3, -1), np.array([0, 0, 1]))
    assert all_noise.clusters == 0 and all_noise.largest == 0 and all_noise.pairwise_precision is None
    assert cluster_stats(np.array([0, 1, 1])).as_dict() == ClusterStats(2, 0, 0.0, 2).as_dict()
    assert cluster_stats(np.array([0, 1, 1])).nmi is None


def test_multi_camera_share_counts_clusters_spanning_cameras_outliers_excluded():
    pseudo = np.array([0, 0, 1, 1, 2, 2, -1])
    cameras = np.array([1, 2, 1, 1, 3, 1, 2])
    assert cluster_stats(pseudo, cameras=cameras).multi_camera_share == 2 / 3
    # an outlier from another camera does not make its neighbours' cluster multi-camera
    assert cluster_stats(np.array([0, 0, -1]), cameras=np.array([1, 1, 2])).multi_camera_share == 0.0
    assert cluster_stats(pseudo).multi_camera_share is None
