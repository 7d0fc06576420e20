"""GRACL cluster memories, relation-aware proxy selection and contrastive losses.

See /work/shared/specs/GRACL.md. GRACL = cluster-contrast (one centroid proxy per pseudo-id) plus two
relation-aware proxies per cluster:

* inter-ID proxy (§3 step 1): the member *most different from other clusters* (smallest closeness score);
* intra-ID proxy (§3 step 2): the member *least similar to its own cluster* (global hardest positive).

Each proxy set lives in a :class:`ProxyMemory` (C x D, InfoNCE with temperature tau, momentum update) and
:class:`GRACLLoss` combines them. The exact scoring rules are not known from the paper (spec tag [I]), so they
are switchable options: ``INTER_RULES`` / ``INTRA_RULES``.

Ties: a two-member cluster's members score the same under either intra rule (each one's only fellow is the
other), so float rounding used to decide its intra proxy. Scores within 1e-6 of the cluster's lowest tie, and a
tie goes to the member *closest* to other clusters: the harder positive, and the one that is not the inter proxy, so the
two memories of a pair differ.

Conventions: features are L2-normalised rows, labels are pseudo-ids in 0..C-1 and -1 marks DBSCAN outliers,
which are ignored everywhere (never chosen as a proxy and never counted as "another cluster"). A cluster with
no members gets proxy index -1 (and, in memories, a zero row).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

INTER_RULES = ("hardest_negative", "knn_mean", "centroid")
INTRA_RULES = ("mean_similarity", "farthest_pair")
# "centroid" (f_i . c) was an intra rule: for unit-norm features it ranks members exactly as mean_similarity
# does (both are monotone in f_i . S_c), so it picked the same member in 4,000 of 4,000 clusters checked.
INTER_NEGATIVES = ("proxies", "centroids")
UPDATE_MODES = ("mean", "hard", "outward", "none")
MEMORY_NAMES = ("centroid", "inter", "intra")
LOSS_FORMS = ("infonce", "pull")


# --------------------------------------------------------------------------------------------- helpers


def _check_labels(labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    labels = labels.long()
    if labels.numel() and (labels.min() < -1 or labels.max() >= num_clusters):
        raise ValueError(f"labels must lie in -1..{num_clusters - 1}")
    return labels


def _cluster_sums(features: torch.Tensor, labels: torch.Tensor, num_clusters: int):
    """(S [C,D] sum of member features, n [C] member count), outliers excluded."""
    keep = labels >= 0
    sums = features.new_zeros(num_clusters, features.shape[1])
    sums.index_add_(0, labels[keep], features[keep])
    counts = torch.bincount(labels[keep], minlength=num_clusters)
    return sums, counts


def _argmin_per_cluster(scores: torch.Tensor, labels: torch.Tensor, num_clusters: int,
                        tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """[C] index of the member with the smallest score in each cluster; empty -> -1. With ``tiebreak``, scores
    within 1e-6 of their cluster's minimum tie, and a tie goes to the smallest tiebreak value; remaining ties ->
    smallest index.

    Done with scatter-reduce passes (min key per cluster, then the members reaching it) so the whole thing stays
    vectorised; comparisons are against the same stored values, so a member always reaches its own minimum."""
    keep = labels >= 0
    idx = torch.arange(labels.numel(), device=labels.device)
    lab, ix = labels[keep], idx[keep]
    alive = torch.ones_like(lab, dtype=torch.bool)
    keys = [(scores[keep], 0.0)] if tiebreak is None else [(scores[keep], 1e-6), (tiebreak[keep], 0.0)]
    for key, tolerance in keys:  # lexicographic: each pass keeps the members at their cluster's minimum
        key = torch.where(alive, key, torch.full_like(key, float("inf")))
        best = key.new_full((num_clusters,), float("inf")).scatter_reduce(0, lab, key, reduce="amin")
        alive = alive & (key <= best[lab] + tolerance)
    sentinel = labels.numel()
    cand = torch.where(alive, ix, torch.full_like(ix, sentinel))
    out = torch.full((num_clusters,), sentinel, dtype=torch.long, device=labels.device)
    out = out.scatter_reduce(0, lab, cand, reduce="amin")
    return torch.where(out == sentinel, torch.full_like(out, -1), out)


# --------------------------------------------------------------------------------------------- selection


def centroids(features: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """[C,D] L2-normalised mean feature per cluster (labels in 0..C-1; -1 = outlier, ignored).

    Normalising the sum equals normalising the mean, so the count is not needed; empty clusters stay zero."""
    labels = _check_labels(labels, num_clusters)
    sums, _ = _cluster_sums(features, labels, num_clusters)
    return F.normalize(sums, dim=1)


def inter_closeness(features, labels, num_clusters, rule="hardest_negative", k=10, chunk=4096) -> torch.Tensor:
    """[N] closeness of each clustered sample to OTHER clusters (outliers get +inf so they are never chosen).

    Rows are processed in chunks against all clustered samples, so peak memory is O(chunk * N). A sample with no
    other-cluster sample at all (C == 1) gets -inf: the max over an empty set."""
    if rule not in INTER_RULES:
        raise ValueError(f"unknown inter rule {rule!r}; options {INTER_RULES}")
    labels = _check_labels(labels, num_clusters)
    n = labels.numel()
    scores = features.new_full((n,), float("inf"))
    rows = torch.nonzero(labels >= 0).flatten()
    if rows.numel() == 0:
        return scores
    ref_feat, ref_lab = features[rows], labels[rows]
    if rule == "centroid":
        # Compare against the other clusters' centroids; empty clusters have no centroid -> masked out too.
        ref_feat = centroids(features, labels, num_clusters)
        ref_lab = torch.arange(num_clusters, device=labels.device)
        empty = torch.bincount(labels[rows], minlength=num_clusters) == 0
    for start in range(0, rows.numel(), chunk):
        r = rows[start:start + chunk]
        sim = features[r] @ ref_feat.T
        mask = ref_lab[None, :] == labels[r][:, None]           # own cluster is not "other"
        if rule == "centroid":
            mask = mask | empty[None, :]
        sim = sim.masked_fill(mask, float("-inf"))
        if rule == "knn_mean":
            scores[r] = _finite_topk_mean(sim, k)
        else:
            scores[r] = sim.max(dim=1).values
    return scores


def _finite_topk_mean(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise mean of the k largest finite entries (fewer if fewer exist; -inf if none)."""
    vals = sim.topk(min(k, sim.shape[1]), dim=1).values
    finite = torch.isfinite(vals)
    total = vals.masked_fill(~finite, 0.0).sum(dim=1)
    cnt = finite.sum(dim=1)
    mean = total / cnt.clamp_min(1).to(vals.dtype)
    return mean.masked_fill(cnt == 0, float("-inf"))


def inter_proxy_index(features, labels, num_clusters, rule="hardest_negative", k=10, chunk=4096) -> torch.Tensor:
    """[C] index (into features) of each cluster's inter-ID relation-aware proxy: the member whose closeness to
    OTHER clusters is smallest, judged globally over all clustered samples (outliers excluded).

    hardest_negative: r(i) = max_{j not in cluster(i), label j != -1} f_i.f_j;
    knn_mean: mean of the k largest such similarities; centroid: max over other clusters' centroids of f_i.c.
    Empty clusters get -1."""
    labels = _check_labels(labels, num_clusters)
    with torch.no_grad():
        scores = inter_closeness(features, labels, num_clusters, rule=rule, k=k, chunk=chunk)
        return _argmin_per_cluster(scores, labels, num_clusters)


def _farthest_fellow(f: torch.Tensor, lab: torch.Tensor, start: int, chunk: int) -> torch.Tensor:
    """Rows start..start+chunk: each one's smallest similarity to another member of its cluster (+inf if none)."""
    rows = torch.arange(start, min(start + chunk, len(f)), device=f.device)
    sim = (f[rows] @ f.T).masked_fill(lab[rows][:, None] != lab[None, :], float("inf"))
    sim[torch.arange(len(rows)), rows] = float("inf")
    return sim.min(dim=1).values


def intra_similarity(features, labels, num_clusters, rule="mean_similarity", chunk=4096) -> torch.Tensor:
    """[N] similarity of each clustered sample to its own cluster (outliers get +inf).

    mean_similarity: mean_{j!=i} f_i.f_j, with the sum-of-members trick (f_i.S_c - f_i.f_i) / (n_c - 1)
    (f_i.f_i instead of the literal 1 keeps it exact for slightly non-unit inputs);
    farthest_pair: min_{j!=i} f_i.f_j, so the two members of the cluster's least similar pair score lowest.
    Singletons score 0: they are the only candidate anyway."""
    if rule not in INTRA_RULES:
        raise ValueError(f"unknown intra rule {rule!r}; options {INTRA_RULES}")
    labels = _check_labels(labels, num_clusters)
    keep = labels >= 0
    scores = features.new_full((labels.numel(),), float("inf"))
    if not keep.any():
        return scores
    f, lab = features[keep], labels[keep]
    sums, counts = _cluster_sums(features, labels, num_clusters)
    n = counts[lab].to(f.dtype)
    if rule == "farthest_pair":
        farthest = torch.cat([_farthest_fellow(f, lab, start, chunk) for start in range(0, len(f), chunk)])
        scores[keep] = torch.where(n > 1, farthest, torch.zeros_like(farthest))
        return scores
    others = (f * sums[lab]).sum(dim=1) - (f * f).sum(dim=1)
    scores[keep] = torch.where(n > 1, others / (n - 1).clamp_min(1), torch.zeros_like(others))
    return scores


def intra_proxy_index(features, labels, num_clusters, rule="mean_similarity", chunk=4096) -> torch.Tensor:
    """[C] index of each cluster's intra-ID relation-aware proxy: the member least like its own cluster
    (smallest intra_similarity); a tie (every two-member cluster) goes to the member closest to other clusters.
    Empty clusters get -1."""
    labels = _check_labels(labels, num_clusters)
    with torch.no_grad():
        scores = intra_similarity(features, labels, num_clusters, rule=rule, chunk=chunk)
        closeness = inter_closeness(features, labels, num_clusters, chunk=chunk)
        return _argmin_per_cluster(scores, labels, num_clusters, tiebreak=-closeness)


def _gather_proxies(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[C,D] normalised features at index; -1 (empty cluster) -> zero row."""
    out = features.new_zeros(index.numel(), features.shape[1])
    ok = index >= 0
    out[ok] = F.normalize(features[index[ok]], dim=1)
    return out


# --------------------------------------------------------------------------------------------- memory


class ProxyMemory(nn.Module):
    """C x D memory of L2-normalised proxies, InfoNCE over all proxies with temperature tau, momentum update.

    forward(f [B,D] L2-normalised, y [B]) -> CE(f @ M.T / tau, y), or with loss="pull" the positive-only
    mean(1 - f . M[y]) (spec §3 step 4: the intra term may be a pull). The memory is a buffer: gradients reach
    f only.
    update(f, y, mode) after the optimiser step (mode defaults to the one given at construction):
      'mean'    cluster-contrast 'cm': for each sample in order, M[y] <- normalize(m M[y] + (1-m) f);
      'hard'    cm_hard: per pseudo-id in the batch, the sample least similar to M[y];
      'outward' per pseudo-id, the sample whose max similarity to the OTHER rows of M is smallest (spec §3 5a);
      'none'    proxies fixed for the epoch (spec §3 5b).
    For 'hard'/'outward' all choices are made against the memory as it was before this update, so the result
    does not depend on the order of pseudo-ids in the batch.

    ``negatives`` [C,D] (optional, fixed): the InfoNCE contrasts the own proxy M[y] against these rows of the
    other clusters instead of their proxies, e.g. centroids: the inter proxies are by construction each
    cluster's most outward member, the easiest negatives there are."""

    def __init__(self, proxies: torch.Tensor, tau: float = 0.05, momentum: float = 0.1, mode: str = "mean",
                 loss: str = "infonce", negatives: torch.Tensor | None = None):
        super().__init__()
        if mode not in UPDATE_MODES:
            raise ValueError(f"unknown update mode {mode!r}; options {UPDATE_MODES}")
        if loss not in LOSS_FORMS:
            raise ValueError(f"unknown loss {loss!r}; options {LOSS_FORMS}")
        self.tau, self.momentum, self.mode, self.loss = float(tau), float(momentum), mode, loss
        init = proxies.detach().clone()
        if init.dtype not in (torch.float32, torch.float64):  # momentum updates in fp16 would drift
            init = init.float()
        self.register_buffer("proxies", F.normalize(init, dim=1))
        if negatives is not None and negatives.shape != init.shape:
            raise ValueError(f"negatives must be shaped like the proxies {tuple(init.shape)}")
        self.register_buffer("negatives", None if negatives is None else negatives.detach().to(init.dtype).clone())

    @property
    def num_clusters(self) -> int:
        return self.proxies.shape[0]

    def logits(self, f: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """[B,C] f . M / tau; with negatives (and the labels y) the other columns are f . negatives / tau."""
        if self.negatives is None or y is None:
            return f @ self.proxies.to(f.dtype).T / self.tau
        positive = (f * self.proxies.to(f.dtype)[y]).sum(dim=1, keepdim=True)
        return (f @ self.negatives.to(f.dtype).T).scatter(1, y[:, None], positive) / self.tau

    def forward(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.long()
        if self.loss == "pull":
            return (1.0 - (f * self.proxies.to(f.dtype)[y]).sum(dim=1)).mean()
        return F.cross_entropy(self.logits(f, y), y)

    @torch.no_grad()
    def update(self, f: torch.Tensor, y: torch.Tensor, mode: Optional[str] = None) -> None:
        mode = self.mode if mode is None else mode
        if mode not in UPDATE_MODES:
            raise ValueError(f"unknown update mode {mode!r}; options {UPDATE_MODES}")
        f, y = f.detach().to(self.proxies.dtype), y.long()
        if y.numel() and (y.min() < 0 or y.max() >= self.num_clusters):
            # -1 would silently index the last row; outliers must be dropped from the training batch (spec §2.3)
            raise ValueError(f"batch labels must lie in 0..{self.num_clusters - 1}")
        if mode == "none":
            return
        if mode == "mean":
            for x, c in zip(f, y.tolist()):          # sequential on purpose: repeated ids compound, as in cm
                self._momentum_step(c, x)
            return
        sim = f @ self.proxies.T                      # [B,C] vs the pre-update memory
        if mode == "hard":
            score = sim.gather(1, y[:, None]).squeeze(1)          # similarity to own proxy
        else:                                                     # outward
            score = sim.scatter(1, y[:, None], float("-inf")).max(dim=1).values
            # with C == 1 there are no other rows: every score is -inf and the first sample wins the tie.
        for c in torch.unique(y).tolist():
            members = torch.nonzero(y == c).flatten()
            self._momentum_step(c, f[members[score[members].argmin()]])

    def _momentum_step(self, c: int, x: torch.Tensor) -> None:
        row = self.momentum * self.proxies[c] + (1.0 - self.momentum) * x
        self.proxies[c] = F.normalize(row, dim=0)


# --------------------------------------------------------------------------------------------- loss


class GRACLLoss(nn.Module):
    """L = w_centroid * L_centroid + w_inter * L_inter + w_intra * L_intra, each an InfoNCE ProxyMemory.

    Construct directly with explicit memories, e.g.
        GRACLLoss(memories={"inter": ProxyMemory(c), "intra": ProxyMemory(c)}, weights={"inter": 1, "intra": 1})
    or each epoch with :meth:`build` from the extracted features and pseudo labels. Memories whose weight is 0
    are not built (saves the O(N^2) inter selection when it is switched off). forward(f, y) returns
    (total, {"centroid", "inter", "intra"}) with 0 for absent terms; call update(f.detach(), y) after the
    optimiser step. w_centroid=1, w_inter=w_intra=0 is exactly cluster-contrast."""

    def __init__(self, memories: Mapping[str, ProxyMemory], weights: Mapping[str, float]):
        super().__init__()
        unknown = set(memories) - set(MEMORY_NAMES)
        if unknown:
            raise ValueError(f"unknown memory names {sorted(unknown)}; options {MEMORY_NAMES}")
        missing = [name for name in memories if name not in weights]
        if missing:
            raise ValueError(f"no weight given for memories {missing}")
        self.memories = nn.ModuleDict(dict(memories))
        self.weights: Dict[str, float] = {name: float(weights[name]) for name in memories}

    @classmethod
    def build(cls, features, labels, num_clusters, w_centroid=0.0, w_inter=1.0, w_intra=1.0,
              inter_rule="hardest_negative", intra_rule="mean_similarity",
              inter_update="outward", intra_update="hard", centroid_update="mean", intra_loss="infonce",
              tau=0.05, momentum=0.1, k=10, chunk=4096, proxies="relation", proxy_momentum=None,
              inter_negatives="proxies") -> "GRACLLoss":
        """proxies="relation" selects the GRACL proxies (spec §3 steps 1-2); proxies="centroid" initialises the
        inter/intra memories from centroids too (ablation: the losses then reduce to cluster-contrast).
        proxy_momentum (default: momentum) is the inter/intra memories' own: with cluster-contrast's 0.1 the
        first update of a row replaces the globally chosen proxy almost entirely. inter_negatives="centroids"
        contrasts L_inter's positive against the other clusters' centroids (see ProxyMemory)."""
        if proxies not in ("relation", "centroid"):
            raise ValueError("proxies must be 'relation' or 'centroid'")
        if inter_negatives not in INTER_NEGATIVES:
            raise ValueError(f"unknown inter negatives {inter_negatives!r}; options {INTER_NEGATIVES}")
        with torch.no_grad():
            features = features.detach()
            labels = _check_labels(labels, num_clusters)
            cent = centroids(features, labels, num_clusters)
            plan = {"centroid": (w_centroid, centroid_update), "inter": (w_inter, inter_update),
                    "intra": (w_intra, intra_update)}
            memories = {}
            for name, (weight, update) in plan.items():
                if weight == 0:
                    continue
                if name == "centroid" or proxies == "centroid":
                    init = cent
                elif name == "inter":
                    init = _gather_proxies(features, inter_proxy_index(
                        features, labels, num_clusters, rule=inter_rule, k=k, chunk=chunk))
                else:
                    init = _gather_proxies(features, intra_proxy_index(
                        features, labels, num_clusters, rule=intra_rule, chunk=chunk))
                own_momentum = momentum if name == "centroid" or proxy_momentum is None else proxy_momentum
                negatives = cent if name == "inter" and inter_negatives == "centroids" else None
                memories[name] = ProxyMemory(init, tau=tau, momentum=own_momentum, mode=update,
                                             loss=intra_loss if name == "intra" else "infonce", negatives=negatives)
        weights = {name: plan[name][0] for name in memories}
        return cls(memories, weights)

    def forward(self, f: torch.Tensor, y: torch.Tensor):
        parts = {name: f.new_zeros(()) for name in MEMORY_NAMES}
        total = f.new_zeros(())
        for name, memory in self.memories.items():
            parts[name] = memory(f, y)
            total = total + self.weights[name] * parts[name]
        return total, parts

    @torch.no_grad()
    def update(self, f: torch.Tensor, y: torch.Tensor) -> None:
        for memory in self.memories.values():
            memory.update(f, y)
