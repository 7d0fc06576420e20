"""Pseudo labels for cluster-contrast style unsupervised re-ID training (GRACL spec §2 steps 2-3).

Each epoch: L2-normalised features of all unlabeled training images -> k-reciprocal Jaccard distance
(Zhong et al. 2017; k1=30, k2=6) -> DBSCAN (eps=0.6, min_samples=4) on that precomputed distance ->
one pseudo label per image, -1 for outliers (dropped for that epoch).

Everything here is sparse and numpy only (no scipy / scikit-learn):

- `jaccard_neighbors` returns the all-pairs Jaccard distance as CSR arrays. A pair only has a distance < 1
  when the two k-reciprocal encodings share a column, so the listed pairs are O(N * k1^2) at most and the
  N x N matrix cluster-contrast builds is never formed.
- `dbscan` runs DBSCAN on such a sparse graph (unlisted pairs are "far"), reproducing sklearn's labels.
- `cluster_stats` summarises a clustering and, given true identities, scores it (NMI, ARI, pair precision /
  recall).

Conventions of `jaccard_neighbors` follow cluster-contrast's `compute_jaccard_distance`
(clustercontrast/utils/faiss_rerank.py), which differ from `index.rerank` (the query-vs-gallery re-ranking
of the published algorithm):
- the neighbour list has k1 entries (self included): the faiss search asks for k1 neighbours, so its
  `initial_rank[i, :k1+1]` has only k1 columns; the 1/2 k1 sets use round(k1/2)+1 entries;
- Gaussian weights are softmax(-d) with d = 2 - 2 cos, not normalised by the row maximum;
- query expansion averages the V rows of the k2 nearest (self included);
- jaccard = 1 - m / (2 - m), m = sum(min(V_i, V_j)), clipped at 0; no original distance mixed in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from index.refine import topk_neighbors
from index.rerank import (BLOCK_BUDGET, _blocks, _expand_sets, _gaussian_weights, _half, _query_expansion,
                          _reciprocal_sets, shared_minima)
from index.vector_index import l2_normalize

# ------------------------------------------------------------------------------------- Jaccard distance


def jaccard_neighbors(features: np.ndarray, k1: int = 30, k2: int = 6, *, max_distance: float = 1.0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse all-pairs k-reciprocal Jaccard distance among N L2-normalised features [N, D], as CSR arrays
    (indptr int64 [N+1], indices int32, distances float32).

    Row i lists, in increasing j, every j whose Jaccard distance to i is < 1, i.e. whose k-reciprocal
    encoding shares at least one entry with i's; i itself is listed with distance 0. Pairs not listed have
    distance 1. The result is symmetric (both (i, j) and (j, i) are listed, with bit-identical distances).
    This is cluster-contrast's `compute_jaccard_distance` (see the module docstring for its conventions),
    i.e. the re-ranking distance with lambda = 0.

    `max_distance` (keyword only) < 1 keeps only the pairs at distance <= max_distance (self always kept).
    Why it exists: the pairs sharing an encoding entry are linear in N but with a large constant. After query
    expansion a row holds up to ~k2 * |R*| columns and a column is held by as many rows, so a row can share
    entries with thousands of others (on 2,000 random 64-d features, k1=30: ~N^2 pairs). DBSCAN only needs
    the pairs within eps, far fewer: pass max_distance=eps (as `pseudo_labels` does). The candidate pairs
    are still enumerated (time), but a block at a time, so memory stays bounded by the kept pairs."""
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    feats = l2_normalize(np.atleast_2d(np.asarray(features, dtype=np.float32)))
    n = len(feats)
    if n == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
    ranked = topk_neighbors(feats, max(k1, k2)).astype(np.int32)  # [N, min(max(k1,k2), N)], self first
    indptr, indices, values = _encodings(feats, ranked, k1, k2)
    return _pairwise_jaccard(indptr, indices, values, max_distance)


def _encodings(feats: np.ndarray, ranked: np.ndarray, k1: int, k2: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k-reciprocal encodings V (CSR, rows sum to 1) from each row's ranked nearest neighbours."""
    n = len(feats)
    recip = _reciprocal_sets(ranked[:, :min(k1, n)])                # R(p, k1): k1 entries, see docstring
    recip_half = _reciprocal_sets(ranked[:, :min(_half(k1) + 1, n)])
    indptr, indices = _expand_sets(recip, recip_half)
    # row_max = 1: plain softmax(-(2 - 2 cos)) over R*(p), as cluster-contrast (no row normalisation)
    values = _gaussian_weights(feats, np.ones(n, np.float32), indptr, indices)
    k_qe = min(k2, ranked.shape[1])
    if k_qe > 1:
        indptr, indices, values = _query_expansion(indptr, indices, values, ranked[:, :k_qe])
    return indptr, indices, values


def _pairwise_jaccard(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, max_distance: float = 1.0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Jaccard distance of every pair of V rows sharing a column (and within max_distance), as CSR.

    sum(min(V_i, V_j)) only has terms on shared columns, so it is gathered through an inverted index
    (column -> rows holding it), a block of rows at a time, and summed per pair with bincount into a
    [rows, N] accumulator (no sort; the block keeps both the gathered terms and the accumulator within
    BLOCK_BUDGET elements). Row i's terms come in its column order, and so do row j's, so (i, j) and (j, i)
    add the same numbers in the same order: the result is exactly symmetric, which DBSCAN relies on."""
    n = len(indptr) - 1
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    order = np.argsort(indices, kind="stable")
    holder_rows, holder_vals = rows[order], values[order]
    col_count = np.bincount(indices, minlength=n)
    col_ptr = np.concatenate([[0], np.cumsum(col_count)])
    pair_cost = np.bincount(rows, weights=col_count[indices], minlength=n).astype(np.int64)

    counts, idx_chunks, dist_chunks = [], [], []
    for start, stop in _blocks(pair_cost, BLOCK_BUDGET, max_rows=max(1, BLOCK_BUDGET // n)):
        shared = shared_minima(indptr, indices, values, rows, (col_count, col_ptr, holder_rows, holder_vals),
                               start, stop, n)
        keys = np.flatnonzero(shared)  # V entries are > 0, so a shared column always leaves a trace
        dist = np.maximum(1.0 - shared[keys] / (2.0 - shared[keys]), 0.0).astype(np.float32)
        if max_distance < 1.0:
            keep = dist <= max_distance
            keys, dist = keys[keep], dist[keep]
        counts.append(np.bincount(keys // n, minlength=stop - start))
        idx_chunks.append((keys % n).astype(np.int32))
        dist_chunks.append(dist)
    out_indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    return out_indptr, np.concatenate(idx_chunks), np.concatenate(dist_chunks)


# ------------------------------------------------------------------------------------------------ DBSCAN


def dbscan(indptr: np.ndarray, indices: np.ndarray, distances: np.ndarray, eps: float = 0.6,
           min_samples: int = 4) -> np.ndarray:
    """DBSCAN (Ester et al. 1996) on a sparse, symmetric distance graph in CSR form; labels int64 [N].

    Neighbours of i: the listed j with distance <= eps, plus i itself (listed or not), as sklearn's
    DBSCAN(metric='precomputed') does. Unlisted pairs are never neighbours (for a Jaccard graph they have
    distance 1, so this matches the dense matrix whenever eps < 1). Core points have >= min_samples
    neighbours; clusters are the connected components of core points, plus each border point (non-core
    with a core neighbour), which joins the adjacent cluster found first; the rest is noise (-1).

    Labels reproduce sklearn's exactly: clusters are numbered in increasing order of their smallest core
    point index (sklearn expands clusters from the lowest unlabelled core point up), and a border point
    adjacent to several clusters gets the lowest-numbered one (the first expansion that reaches it)."""
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    distances = np.asarray(distances)
    n = len(indptr) - 1
    if len(indices) != indptr[-1] or len(distances) != indptr[-1]:
        raise ValueError("indptr, indices and distances do not form a CSR matrix")
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    close = (distances <= eps) & (indices != rows)  # self is added once below, listed or not
    src, dst = rows[close], indices[close]
    is_core = np.bincount(src, minlength=n) + 1 >= min_samples

    labels = np.full(n, -1, dtype=np.int64)
    core_edge = is_core[src] & is_core[dst]
    root = _component_min(n, src[core_edge], dst[core_edge])  # smallest index of each core's component
    core_roots = np.unique(root[is_core])                     # ascending = sklearn's cluster order
    cluster_of_root = np.full(n, -1, dtype=np.int64)
    cluster_of_root[core_roots] = np.arange(len(core_roots))
    labels[is_core] = cluster_of_root[root[is_core]]

    border_edge = ~is_core[src] & is_core[dst]
    if border_edge.any():
        b_src, b_cluster = src[border_edge], labels[dst[border_edge]]
        best = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(best, b_src, b_cluster)  # border edges are few: ufunc.at is fast enough
        is_border = best < np.iinfo(np.int64).max
        labels[is_border] = best[is_border]
    return labels


def _component_min(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """For each node, the smallest node index of its connected component (edges taken as undirected).

    Min-label propagation with pointer jumping, vectorised: every round each node takes the minimum label
    over its edges, then labels are shortcut (label = label[label]) until stable. Labels only decrease and
    always name a node of the same component, and a node's label can only stop changing at the
    component's minimum, so the fixed point is exact."""
    label = np.arange(n, dtype=np.int64)
    if len(src) == 0:
        return label
    a = np.concatenate([src, dst])
    b = np.concatenate([dst, src])
    order = np.argsort(a, kind="stable")
    a, b = a[order], b[order]
    starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
    heads = a[starts]
    while True:
        new = label.copy()
        new[heads] = np.minimum(new[heads], np.minimum.reduceat(label[b], starts))
        while True:  # pointer jumping: follow labels to their current root
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return label
        label = new


# ------------------------------------------------------------------------------------------- statistics


@dataclass
class ClusterStats:
    clusters: int
    outliers: int
    outlier_share: float
    largest: int
    nmi: float | None = None
    ari: float | None = None
    pairwise_precision: float | None = None
    pairwise_recall: float | None = None
    # share of the clusters whose members come from more than one camera: only those teach view invariance
    multi_camera_share: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def cluster_stats(pseudo: np.ndarray, true_ids: np.ndarray | None = None,
                  cameras: np.ndarray | None = None) -> ClusterStats:
    """Cluster count, outlier count and share, largest cluster size; with `cameras` (label free) the share of
    clusters spanning more than one camera; with true identities also:

    - NMI (arithmetic normalisation, sklearn's default) and ARI, over ALL samples, each outlier (-1)
      counted as its own singleton cluster. So dropping an image is scored like isolating it, and a
      clustering that marks everything as noise is not rewarded.
    - pairwise precision / recall over the clustered samples only (outliers excluded): of the pairs placed in
      the same cluster, the share truly sharing an identity; of the pairs truly sharing an identity (both
      clustered), the share placed in the same cluster. None where there is no such pair.

    Degenerate cases follow sklearn: NMI = 1 when both labelings have a single label (or none), 0 when the
    mutual information is 0; ARI = 1 when the two labelings agree on every pair trivially."""
    pseudo = np.asarray(pseudo).astype(np.int64).ravel()
    n = len(pseudo)
    is_out = pseudo < 0
    sizes = np.bincount(pseudo[~is_out]) if (~is_out).any() else np.zeros(0, np.int64)
    sizes = sizes[sizes > 0]
    stats = ClusterStats(clusters=len(sizes), outliers=int(is_out.sum()),
                         outlier_share=float(is_out.mean()) if n else 0.0,
                         largest=int(sizes.max()) if len(sizes) else 0)
    if cameras is not None and stats.clusters:
        kept = ~is_out
        pairs = np.unique(np.stack([pseudo[kept], np.asarray(cameras).ravel()[kept]]), axis=1)
        cameras_per_cluster = np.bincount(pairs[0])
        stats.multi_camera_share = float((cameras_per_cluster[cameras_per_cluster > 0] > 1).mean())
    if true_ids is None:
        return stats
    true_ids = np.asarray(true_ids).ravel()
    if len(true_ids) != n:
        raise ValueError(f"pseudo ({n}) and true_ids ({len(true_ids)}) differ in length")

    singletons = pseudo.copy()
    singletons[is_out] = (pseudo.max(initial=-1) + 1) + np.arange(stats.outliers)
    stats.nmi = _nmi(singletons, true_ids)
    stats.ari = _ari(singletons, true_ids)
    tp, pred_pairs, true_pairs, _ = _pair_counts(pseudo[~is_out], true_ids[~is_out])
    stats.pairwise_precision = tp / pred_pairs if pred_pairs else None
    stats.pairwise_recall = tp / true_pairs if true_pairs else None
    return stats


def _contingency(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-zero cells n_ij of the contingency table of two labelings, and its row and column sums."""
    _, a_idx = np.unique(a, return_inverse=True)
    _, b_idx = np.unique(b, return_inverse=True)
    a_idx, b_idx = a_idx.ravel(), b_idx.ravel()
    _, cells = np.unique(a_idx * (b_idx.max(initial=0) + 1) + b_idx, return_counts=True)
    return cells, np.bincount(a_idx), np.bincount(b_idx)


def _pairs(counts: np.ndarray) -> float:
    counts = counts.astype(np.float64)
    return float(np.sum(counts * (counts - 1) / 2))


def _pair_counts(pred: np.ndarray, true: np.ndarray) -> tuple[float, float, float, float]:
    """Pairs in the same cluster in both, in pred, in true; and all pairs."""
    n = len(pred)
    if n == 0:
        return 0.0, 0.0, 0.0, 0.0
    cells, pred_sizes, true_sizes = _contingency(pred, true)
    return _pairs(cells), _pairs(pred_sizes), _pairs(true_sizes), n * (n - 1) / 2


def _ari(pred: np.ndarray, true: np.ndarray) -> float:
    """Adjusted Rand index, (index - expected) / (max - expected) over pair counts (Hubert & Arabie)."""
    tp, pred_pairs, true_pairs, total = _pair_counts(pred, true)
    if total == 0:
        return 1.0
    expected = pred_pairs * true_pairs / total
    maximum = (pred_pairs + true_pairs) / 2
    if maximum == expected:  # both all-singletons or both one cluster: identical, trivially
        return 1.0
    return float((tp - expected) / (maximum - expected))


def _nmi(pred: np.ndarray, true: np.ndarray) -> float:
    """Normalised mutual information, MI / mean(H(pred), H(true)), natural logs."""
    n = len(pred)
    if n == 0 or (len(np.unique(pred)) == 1 and len(np.unique(true)) == 1):
        return 1.0
    # MI needs the cells together with their marginals, so rebuild the table with its coordinates
    _, a_idx = np.unique(pred, return_inverse=True)
    _, b_idx = np.unique(true, return_inverse=True)
    a_idx, b_idx = a_idx.ravel(), b_idx.ravel()
    width = b_idx.max() + 1
    keys, cells = np.unique(a_idx * width + b_idx, return_counts=True)
    a_sizes, b_sizes = np.bincount(a_idx), np.bincount(b_idx)
    cells = cells.astype(np.float64)
    mi = float(np.sum(cells / n * np.log(n * cells / (a_sizes[keys // width] * b_sizes[keys % width]))))
    if mi <= 0:
        return 0.0
    h_pred, h_true = _entropy(a_sizes / n), _entropy(b_sizes / n)
    return float(min(mi / ((h_pred + h_true) / 2), 1.0))


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


# ------------------------------------------------------------------------------------------------ entry


def pseudo_labels(features: np.ndarray, eps: float = 0.6, min_samples: int = 4, k1: int = 30,
                  k2: int = 6) -> np.ndarray:
    """Pseudo labels int64 [N] of L2-normalised features [N, D]: `jaccard_neighbors` then `dbscan`;
    -1 marks outliers. eps must be < 1: pairs that share no encoding entry have Jaccard distance 1 and are
    not stored, so eps >= 1 would need the (dense) pairs the sparse graph leaves out."""
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must lie in [0, 1) for the sparse Jaccard graph, got {eps}")
    return dbscan(*jaccard_neighbors(features, k1, k2, max_distance=eps), eps=eps, min_samples=min_samples)
