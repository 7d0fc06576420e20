"""k-reciprocal re-ranking (Zhong et al., CVPR 2017, "Re-ranking Person Re-identification with k-reciprocal
Encoding"), numpy only.

Two implementations of the same algorithm:

- `k_reciprocal_rerank`: the scalable one. Memory O((Q+G) * k) for the neighbour lists and the sparse
  encodings, plus one block of rows at a time; it never holds a (Q+G)x(Q+G) matrix. This is the one the
  service and the benchmarks use.
- `k_reciprocal_rerank_dense`: the reference layout of reid-strong-baseline (`utils/re_ranking.py`, after
  the authors' Python version for features): features in, full (Q+G)^2 squared Euclidean distance matrix,
  full argsort, dense float16 V and Jaccard. Quadratic in memory; kept to check the scalable version against
  and to compare in benchmarks. torchreid's and fast-reid's `re_ranking` are a variant of the same code that
  takes distance matrices in, works in float32 and squares its input (see the caveat below).

Conventions shared by both, mirroring the reference code:
- the original distance of two L2-normalised features is the squared Euclidean distance 2 - 2 cos (the
  diagonal is exactly 0, so every point is its own rank-0 neighbour);
- the reference builds the full matrix M, divides every column by its maximum and transposes. M being
  symmetric, entry (i, j) of the result is d(i, j) / max_k d(i, k): each row is scaled by the maximum of
  its own row (= of its own column). That scaling leaves every row's ranking unchanged but it enters the
  Gaussian weights exp(-d) and the lambda term of the final distance;
- neighbour lists are ranked by that normalised distance, ties by index (stable sort);
- V rows sum to 1, so sum(max) = 2 - sum(min) and the Jaccard distance is 1 - m / (2 - m), m = sum(min).

Caveat: torchreid feeds its `re_ranking` squared Euclidean distances and squares them again
(`np.power(original_dist, 2)`), i.e. it effectively ranks on d^2 with weights exp(-d^2 / max d^2). Here, as
in reid-strong-baseline, the original distance is d = 2 - 2 cos itself, as the published algorithm defines it.
"""

from __future__ import annotations

import numpy as np

from .vector_index import l2_normalize

# Rows of the (Q+G) x (Q+G) distance matrix computed at once: 1024 x 20,000 float32 is 80 MB.
ROW_CHUNK = 1024
# Elements of the temporary arrays of the vectorised steps (set expansion, query expansion, Jaccard):
# bounds their memory to a few tens of MB whatever k1 and the set sizes are.
BLOCK_BUDGET = 2_000_000


def _stack_normalized(query, gallery, k1, k2, lambda_value) -> tuple[np.ndarray, int, int]:
    """Checked parameters; [queries; gallery], L2-normalised, with the two counts."""
    _check_params(k1, k2, lambda_value)
    query, gallery = l2_normalize(np.atleast_2d(query)), l2_normalize(np.atleast_2d(gallery))
    return np.concatenate([query, gallery]), len(query), len(gallery)


def k_reciprocal_rerank(query: np.ndarray, gallery: np.ndarray, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3) -> np.ndarray:
    """Final distance matrix [Q, G] (smaller = more similar) of k-reciprocal re-ranking over the query+gallery
    set, given L2-normalised float32 features query [Q,D], gallery [G,D].

    final = jaccard * (1 - lambda_value) + original * lambda_value, where `original` is the row-normalised
    squared Euclidean distance (see the module docstring) and `jaccard` the Jaccard distance of the
    k-reciprocal encodings V (k1 nearest neighbours, 1/2 k1 expansion, Gaussian weights, local query
    expansion over the k2 nearest neighbours). Memory O((Q+G) * k) plus one block of rows; V in float32."""
    feats, num_q, num_g = _stack_normalized(query, gallery, k1, k2, lambda_value)
    if num_q == 0 or num_g == 0:
        return np.zeros((num_q, num_g), np.float32)
    n = len(feats)
    k_full, k_half = min(k1 + 1, n), min(_half(k1) + 1, n)
    k_qe = min(k2, n)

    ranked, row_max = _ranked_neighbours(feats, max(k_full, k_qe))
    recip = _reciprocal_sets(ranked[:, :k_full])
    recip_half = _reciprocal_sets(ranked[:, :k_half])
    indptr, indices = _expand_sets(recip, recip_half)
    values = _gaussian_weights(feats, row_max, indptr, indices)
    if k_qe > 1:
        indptr, indices, values = _query_expansion(indptr, indices, values, ranked[:, :k_qe])
    return _final_distance(feats, row_max, indptr, indices, values, num_q, lambda_value)


def k_reciprocal_rerank_dense(query: np.ndarray, gallery: np.ndarray, k1: int = 20, k2: int = 6,
                              lambda_value: float = 0.3, *, v_dtype=np.float16) -> np.ndarray:
    """The same re-ranking in reid-strong-baseline's layout (`utils/re_ranking.py`): features in, the full
    (Q+G)^2 squared Euclidean distance matrix divided by its column maxima and transposed, argsort of full
    rows, V as a dense (Q+G)x(Q+G) float16 matrix, float16 Jaccard accumulation. (torchreid's and fast-reid's
    `re_ranking` take distance matrices instead, in float32, and square them.) Written from the published
    algorithm. O((Q+G)^2) memory and Python loops over rows: for comparisons and small sets only.

    `v_dtype` (keyword only) is the precision of V and of the Jaccard accumulation: float16 as the reference;
    float64 gives the exact algorithm, which `k_reciprocal_rerank` matches to float32 rounding (~1e-7),
    whereas float16 alone moves the distances by up to a few 1e-3."""
    feats, num_q, num_g = _stack_normalized(query, gallery, k1, k2, lambda_value)
    if num_q == 0 or num_g == 0:
        return np.zeros((num_q, num_g), np.float32)
    n = len(feats)

    dist = _squared_distances(feats, feats)
    np.fill_diagonal(dist, 0.0)
    original = np.transpose(dist / _safe_max(np.max(dist, axis=0)))
    ranks = np.argsort(original, axis=1, kind="stable").astype(np.int32)

    half = _half(k1)
    V = np.zeros((n, n), dtype=v_dtype)
    for p in range(n):
        recip = _dense_reciprocal(ranks, p, k1)
        expanded = recip
        for candidate in recip:
            candidate_set = _dense_reciprocal(ranks, candidate, half)
            # a candidate brings its own (smaller) reciprocal set when that set mostly lies in R(p, k1)
            if len(np.intersect1d(candidate_set, recip)) > 2.0 / 3 * len(candidate_set):
                expanded = np.append(expanded, candidate_set)
        expanded = np.unique(expanded)
        weight = np.exp(-original[p, expanded])
        V[p, expanded] = weight / np.sum(weight)

    if k2 != 1:
        V = np.stack([V[ranks[p, :k2]].mean(axis=0) for p in range(n)]).astype(v_dtype)

    holders = [np.nonzero(V[:, col])[0] for col in range(n)]  # inverted index: rows with V[row, col] != 0
    jaccard = np.zeros((num_q, n), dtype=v_dtype)
    for i in range(num_q):
        temp_min = np.zeros(n, dtype=v_dtype)
        for col in np.nonzero(V[i])[0]:
            rows = holders[col]
            temp_min[rows] = temp_min[rows] + np.minimum(V[i, col], V[rows, col])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)

    final = jaccard * (1 - lambda_value) + original[:num_q] * lambda_value
    return np.ascontiguousarray(final[:, num_q:], dtype=np.float32)


# ----------------------------------------------------------------------------------------------- shared


def _check_params(k1: int, k2: int, lambda_value: float) -> None:
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must lie in [0, 1], got {lambda_value}")


def _half(k1: int) -> int:
    """round(k1 / 2) as the reference computes it (np.around: halves to even, so k1=5 -> 2, k1=7 -> 4)."""
    return int(np.around(k1 / 2.0))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2 - 2 cos of normalised rows, clipped at 0 (rounding can push a point's distance to itself below)."""
    dist = a @ b.T
    dist *= -2.0
    dist += 2.0
    return np.maximum(dist, 0.0, out=dist)


def _safe_max(row_max: np.ndarray) -> np.ndarray:
    """Only all-identical features give a zero maximum: their distances stay 0 instead of becoming NaN."""
    return np.where(row_max > 0, row_max, np.float32(1.0)).astype(np.float32)


def _dense_reciprocal(ranks: np.ndarray, p: int, k: int) -> np.ndarray:
    """R(p, k): p's k+1 nearest (itself included) that have p among their own k+1 nearest."""
    forward = ranks[p, :k + 1]
    backward = ranks[forward, :k + 1]
    return forward[np.any(backward == p, axis=1)]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for every (s, l): how CSR rows are gathered without a Python loop."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts.astype(np.int64) - offsets, lengths) + np.arange(total, dtype=np.int64)


def _blocks(costs: np.ndarray, budget: int, max_rows: int | None = None):
    """Consecutive [start, stop) row ranges whose summed cost stays within budget (at least one row each)."""
    n = len(costs)
    cumulative = np.concatenate([[0], np.cumsum(costs, dtype=np.int64)])
    start = 0
    while start < n:
        stop = int(np.searchsorted(cumulative, cumulative[start] + budget, side="right")) - 1
        stop = max(stop, start + 1)
        if max_rows is not None:
            stop = min(stop, start + max_rows)
        yield start, min(stop, n)
        start = min(stop, n)


# ---------------------------------------------------------------------------------- scalable pipeline


def _ranked_neighbours(feats: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `width` nearest rows by normalised distance (itself first), best first, and each row's
    maximum distance (the reference's column maximum, by symmetry). One block of rows at a time."""
    n = len(feats)
    ranked = np.empty((n, width), dtype=np.int32)
    row_max = np.empty(n, dtype=np.float32)
    for start in range(0, n, ROW_CHUNK):
        stop = min(start + ROW_CHUNK, n)
        dist = _squared_distances(feats[start:stop], feats)
        dist[np.arange(stop - start), np.arange(start, stop)] = 0.0
        row_max[start:stop] = dist.max(axis=1)
        dist /= _safe_max(row_max[start:stop])[:, None]  # rank on the same float32 values as the reference
        ranked[start:stop] = _smallest(dist, width)
    return ranked, row_max


def _smallest(dist: np.ndarray, width: int) -> np.ndarray:
    """Column indices of each row's `width` smallest entries, sorted by value then index (the order of a
    stable argsort, ties at the cut included). Partitioning the values to find each row's cut is ~3x
    faster than argpartition, which writes an int64 index for every entry."""
    rows, n = dist.shape
    if width < n:
        cut = np.partition(dist, width - 1, axis=1)[:, width - 1]
        row, col = np.nonzero(dist <= cut[:, None])  # >= width per row, more only on ties at the cut
    else:
        row, col = np.repeat(np.arange(rows), n), np.tile(np.arange(n), rows)
    order = np.lexsort((col, dist[row, col], row))
    row, col = row[order], col[order]
    rank_in_row = np.arange(len(row)) - np.searchsorted(row, row)  # row is sorted: first position of each
    keep = rank_in_row < width
    return col[keep].reshape(rows, width)


def _reciprocal_sets(top: np.ndarray) -> np.ndarray:
    """R(p, k) for every p from the k+1 nearest `top` [N, k+1]: row p keeps the neighbours that have p in
    their own top, in rank order; the others become -1 (fixed width, no ragged lists)."""
    n, k = top.shape
    out = np.empty_like(top)
    rows_per_block = max(1, BLOCK_BUDGET // (k * k))
    for start in range(0, n, rows_per_block):
        stop = min(start + rows_per_block, n)
        forward = top[start:stop]
        backward = top[forward]  # [rows, k, k]: the neighbours' own neighbours
        mutual = (backward == np.arange(start, stop, dtype=top.dtype)[:, None, None]).any(axis=2)
        out[start:stop] = np.where(mutual, forward, -1)
    return out


def _expand_sets(recip: np.ndarray, recip_half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The expanded sets R*(p) = R(p, k1) plus R(q, k1/2) for every q in R(p, k1) with
    |R(q, k1/2) ∩ R(p, k1)| > 2/3 |R(q, k1/2)|, as CSR (indptr, indices sorted per row)."""
    n, k_full = recip.shape
    k_half = recip_half.shape[1]
    half_size = (recip_half >= 0).sum(axis=1)
    counts, chunks = [], []
    rows_per_block = max(1, BLOCK_BUDGET // (k_full * k_half * k_full))
    for start in range(0, n, rows_per_block):
        stop = min(start + rows_per_block, n)
        r = recip[start:stop]  # [rows, k_full]
        is_member = r >= 0
        cand_sets = recip_half[np.where(is_member, r, 0)]  # [rows, k_full, k_half]
        # -2 for R(p)'s holes so that they never match the -1 holes of the candidates' sets
        r_cmp = np.where(is_member, r, -2)
        shared = (cand_sets[:, :, :, None] == r_cmp[:, None, None, :]).sum(axis=(2, 3))
        accept = is_member & (shared > 2.0 / 3 * half_size[np.where(is_member, r, 0)])
        added = np.where(accept[:, :, None], cand_sets, -1).reshape(stop - start, -1)
        members = np.concatenate([r, added], axis=1).astype(np.int64)
        # per-row unique: holes sort last as n, then keep each value's first occurrence
        members[members < 0] = n
        members.sort(axis=1)
        keep = members < n
        keep[:, 1:] &= members[:, 1:] != members[:, :-1]
        counts.append(keep.sum(axis=1))
        chunks.append(members[keep].astype(np.int32))
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    return indptr, np.concatenate(chunks)


def _gaussian_weights(feats: np.ndarray, row_max: np.ndarray, indptr: np.ndarray,
                      indices: np.ndarray) -> np.ndarray:
    """V(p, q) = exp(-d(p, q)) / sum over R*(p), d the row-normalised distance computed from the features
    pair by pair (the expanded sets reach beyond p's top-k, so no stored row holds all the distances)."""
    n = len(feats)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    dist = np.empty(len(indices), dtype=np.float32)
    step = max(1, BLOCK_BUDGET // feats.shape[1])
    for start in range(0, len(indices), step):
        r, c = rows[start:start + step], indices[start:start + step]
        dot = np.einsum("ij,ij->i", feats[r], feats[c])
        dist[start:start + step] = np.where(r == c, 0.0, np.maximum(2.0 - 2.0 * dot, 0.0))
    dist /= _safe_max(row_max)[rows]
    weight = np.exp(-dist)
    return (weight / np.bincount(rows, weights=weight, minlength=n)[rows]).astype(np.float32)


def _query_expansion(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                     neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local query expansion: row p becomes the mean of the V rows of its k2 nearest (itself included).
    Sparse: gather those rows' entries, merge equal columns, divide by k2."""
    n, k = neighbours.shape
    row_nnz = np.diff(indptr)
    cost = row_nnz[neighbours].sum(axis=1)  # entries gathered for each destination row
    counts, idx_chunks, val_chunks = [], [], []
    for start, stop in _blocks(cost, BLOCK_BUDGET):
        src = neighbours[start:stop].ravel()
        lengths = row_nnz[src]
        pos = _ranges(indptr[src], lengths)
        dst = np.repeat(np.repeat(np.arange(stop - start, dtype=np.int64), k), lengths)
        keys, inverse = np.unique(dst * n + indices[pos], return_inverse=True)
        summed = np.bincount(inverse.ravel(), weights=values[pos], minlength=len(keys))
        counts.append(np.bincount(keys // n, minlength=stop - start))
        idx_chunks.append((keys % n).astype(np.int32))
        val_chunks.append((summed / k).astype(np.float32))
    new_indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    return new_indptr, np.concatenate(idx_chunks), np.concatenate(val_chunks)


def shared_minima(indptr, indices, values, rows, inverted, start: int, stop: int, width: int) -> np.ndarray:
    """sum(min(V_i, V_j)) for rows i in [start, stop) against the rows j of an inverted index
    (col_count, col_ptr, holder_rows, holder_vals: column -> rows holding it), flattened [(stop-start) * width].
    Only columns both rows hold contribute, so the terms are gathered, not a dense product."""
    col_count, col_ptr, holder_rows, holder_vals = inverted
    e0, e1 = indptr[start], indptr[stop]
    cols = indices[e0:e1]
    lengths = col_count[cols]
    pos = _ranges(col_ptr[cols], lengths)
    local = np.repeat(rows[e0:e1] - start, lengths)
    mins = np.minimum(np.repeat(values[e0:e1], lengths), holder_vals[pos])
    return np.bincount(local * width + holder_rows[pos], weights=mins, minlength=(stop - start) * width)


def _final_distance(feats: np.ndarray, row_max: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
                    values: np.ndarray, num_q: int, lambda_value: float) -> np.ndarray:
    """Jaccard distance of each query row to each gallery row, mixed with the original distance.

    sum(min(V_i, V_j)) only has terms on columns both rows hold, so it is gathered through an inverted index
    (column -> gallery rows holding it) and summed per (query, gallery) pair with bincount, a block of
    queries at a time."""
    n = len(feats)
    num_g = n - num_q
    g_start = indptr[num_q]
    g_rows = np.repeat(np.arange(num_g, dtype=np.int64), np.diff(indptr[num_q:]))
    g_cols = indices[g_start:]
    order = np.argsort(g_cols, kind="stable")
    holder_rows, holder_vals = g_rows[order], values[g_start:][order]
    col_count = np.bincount(g_cols, minlength=n)
    col_ptr = np.concatenate([[0], np.cumsum(col_count)])

    q_nnz = np.diff(indptr[:num_q + 1])
    q_rows = np.repeat(np.arange(num_q), q_nnz)
    pair_cost = np.bincount(q_rows, weights=col_count[indices[:g_start]], minlength=num_q).astype(np.int64)
    scale = _safe_max(row_max[:num_q])
    query, gallery = feats[:num_q], feats[num_q:]

    out = np.empty((num_q, num_g), dtype=np.float32)
    for start, stop in _blocks(pair_cost, BLOCK_BUDGET, max_rows=max(1, BLOCK_BUDGET // num_g)):
        temp_min = shared_minima(indptr, indices, values, q_rows, (col_count, col_ptr, holder_rows, holder_vals),
                                 start, stop, num_g).reshape(stop - start, num_g)
        jaccard = 1.0 - temp_min / (2.0 - temp_min)
        original = _squared_distances(query[start:stop], gallery) / scale[start:stop, None]
        out[start:stop] = jaccard * (1.0 - lambda_value) + original * lambda_value
    return out
