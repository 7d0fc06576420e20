"""GRACL memories: proxy selection against brute-force definitions, reduction to cluster-contrast,
ProxyMemory loss/update semantics, and an optimisation sanity check. CPU only, float64 for exact comparisons."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.gracl.memory import (
    INTER_RULES,
    INTRA_RULES,
    GRACLLoss,
    ProxyMemory,
    centroids,
    inter_proxy_index,
    intra_proxy_index,
)

C, PER, D = 5, 8, 16


def toy(seed=0, noise=0.35, dtype=torch.float64):
    """5 clusters x 8 members around random unit centres in D=16, normalised."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(C, D, generator=g, dtype=dtype), dim=1)
    labels = torch.arange(C).repeat_interleave(PER)
    feats = F.normalize(centres[labels] + noise * torch.randn(C * PER, D, generator=g, dtype=dtype), dim=1)
    return feats, labels


# ----------------------------------------------------------------------------- brute-force definitions


def brute_inter(feats, labels, rule, k=10):
    sim = (feats @ feats.T).tolist()
    lab = labels.tolist()
    n = len(lab)
    cent = centroids(feats, labels, C).tolist() if rule == "centroid" else None
    out = []
    for c in range(C):
        best, best_i = math.inf, -1
        for i in range(n):
            if lab[i] != c:
                continue
            if rule == "centroid":
                r = max(sum(a * b for a, b in zip(feats[i].tolist(), cent[o])) for o in range(C) if o != c)
            else:
                negs = sorted((sim[i][j] for j in range(n) if lab[j] not in (c, -1)), reverse=True)
                r = negs[0] if rule == "hardest_negative" else sum(negs[:k]) / len(negs[:k])
            if r < best:
                best, best_i = r, i
        out.append(best_i)
    return out


def brute_intra(feats, labels, rule):
    """Smallest score, ties (at 1e-6) to the member with the largest hardest-negative similarity."""
    sim = (feats @ feats.T).tolist()
    lab = labels.tolist()
    out = []
    for c in range(C):
        members = [i for i in range(len(lab)) if lab[i] == c]
        scored = []
        for i in members:
            others = [sim[i][j] for j in members if j != i]
            if not others:
                r = 0.0
            else:
                r = min(others) if rule == "farthest_pair" else sum(others) / len(others)
            closeness = max((sim[i][j] for j in range(len(lab)) if lab[j] not in (c, -1)), default=-math.inf)
            scored.append((r, -closeness, i))
        lowest = min(r for r, _, _ in scored) if scored else 0.0
        out.append(min((c, i) for r, c, i in scored if r <= lowest + 1e-6)[1] if scored else -1)
    return out


# ----------------------------------------------------------------------------- 1. proxy selection


@pytest.mark.parametrize("rule", INTER_RULES)
def test_inter_proxy_matches_brute_force_and_chunking(rule):
    feats, labels = toy()
    got = inter_proxy_index(feats, labels, C, rule=rule, k=3)
    assert got.tolist() == brute_inter(feats, labels, rule, k=3)
    assert (labels[got] == torch.arange(C)).all()
    assert torch.equal(inter_proxy_index(feats, labels, C, rule=rule, k=3, chunk=3), got)


@pytest.mark.parametrize("rule", INTRA_RULES)
def test_intra_proxy_matches_brute_force(rule):
    feats, labels = toy(seed=1)
    got = intra_proxy_index(feats, labels, C, rule=rule)
    assert got.tolist() == brute_intra(feats, labels, rule)
    assert (labels[got] == torch.arange(C)).all()


def test_knn_mean_with_k_larger_than_negatives_uses_all_negatives():
    feats, labels = toy(seed=2)
    n_neg = (C - 1) * PER
    assert inter_proxy_index(feats, labels, C, "knn_mean", k=10_000).tolist() == \
        brute_inter(feats, labels, "knn_mean", k=n_neg)


def with_adversarial_outliers(feats, labels):
    """Append, for each cluster, an outlier that is a near copy of that cluster's true inter proxy. If outliers
    counted as 'other clusters', that member's hardest negative would be ~1 and it could no longer be chosen."""
    true = inter_proxy_index(feats, labels, C, "hardest_negative")
    g = torch.Generator().manual_seed(7)
    outl = F.normalize(feats[true] + 1e-3 * torch.randn(C, D, generator=g, dtype=feats.dtype), dim=1)
    # interleave outliers at the front so indices of clustered samples shift (catches index bookkeeping bugs)
    return torch.cat([outl, feats]), torch.cat([torch.full((C,), -1), labels]), true + C


@pytest.mark.parametrize("rule", INTER_RULES)
def test_outliers_never_chosen_and_never_negatives(rule):
    feats, labels = toy(seed=3)
    feats_o, labels_o, shifted_true = with_adversarial_outliers(feats, labels)
    got = inter_proxy_index(feats_o, labels_o, C, rule=rule, k=3, chunk=4)
    assert (labels_o[got] >= 0).all()
    assert got.tolist() == brute_inter(feats_o, labels_o, rule, k=3)
    # same selection as without the outliers (indices shifted by C)
    assert got.tolist() == (inter_proxy_index(feats, labels, C, rule=rule, k=3) + C).tolist()
    if rule == "hardest_negative":
        assert torch.equal(got, shifted_true)
        # sanity of the construction: counting outliers as negatives would change the answer
        fake = labels_o.clone()
        fake[:C] = torch.arange(C).roll(1)  # pretend each outlier belongs to a different cluster
        assert not torch.equal(inter_proxy_index(feats_o, fake, C), got)
    for intra_rule in INTRA_RULES:
        gi = intra_proxy_index(feats_o, labels_o, C, rule=intra_rule)
        assert (labels_o[gi] >= 0).all()
        assert gi.tolist() == (intra_proxy_index(feats, labels, C, rule=intra_rule) + C).tolist()


def test_singleton_and_empty_clusters():
    feats, labels = toy(seed=4)
    labels = labels.clone()
    labels[labels == 4] = -1          # cluster 4 empty
    labels[0] = 3                     # move one sample; cluster 0 keeps 7 members
    labels[PER * 3:PER * 3 + 7] = -1  # cluster 3 now: original last member + index 0 -> 2 members
    labels[PER * 3 + 7] = -1          # ... make it a singleton: only index 0
    assert (labels == 3).nonzero().flatten().tolist() == [0]
    for rule in INTRA_RULES:
        idx = intra_proxy_index(feats, labels, 5, rule=rule)
        assert idx[3] == 0 and idx[4] == -1
    for rule in INTER_RULES:
        idx = inter_proxy_index(feats, labels, 5, rule=rule)
        assert idx[3] == 0 and idx[4] == -1
    assert torch.equal(centroids(feats, labels, 5)[4], torch.zeros(D, dtype=feats.dtype))


def test_centroids_are_normalised_means():
    feats, labels = toy()
    cent = centroids(feats, labels, C)
    for c in range(C):
        assert torch.allclose(cent[c], F.normalize(feats[labels == c].mean(0), dim=0))


# ----------------------------------------------------------------------------- 2. reduction to cluster-contrast


def batch(feats, labels, seed):
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(labels), generator=g)[:16]
    f = F.normalize(feats[pick] + 0.2 * torch.randn(16, D, generator=g, dtype=feats.dtype), dim=1)
    return f, labels[pick]


def loss_and_grad(loss_fn, f, y):
    f = f.clone().requires_grad_(True)
    total, parts = loss_fn(f, y)
    total.backward()
    return total.detach(), f.grad, parts


@pytest.mark.parametrize("how", ["build_override", "explicit_memories"])
def test_centroid_proxies_reduce_to_cluster_contrast(how):
    feats, labels = toy()
    cc = GRACLLoss.build(feats, labels, C, w_centroid=1.0, w_inter=0.0, w_intra=0.0)
    if how == "build_override":
        gr = GRACLLoss.build(feats, labels, C, w_centroid=0.0, w_inter=1.0, w_intra=1.0, proxies="centroid",
                             inter_update="mean", intra_update="mean")
    else:
        cent = centroids(feats, labels, C)
        gr = GRACLLoss(memories={"inter": ProxyMemory(cent), "intra": ProxyMemory(cent)},
                       weights={"inter": 1.0, "intra": 1.0})
    assert set(cc.memories) == {"centroid"} and set(gr.memories) == {"inter", "intra"}
    for step in range(3):  # stays equal across memory updates too
        f, y = batch(feats, labels, seed=step)
        l_cc, g_cc, p_cc = loss_and_grad(cc, f, y)
        l_gr, g_gr, p_gr = loss_and_grad(gr, f, y)
        assert torch.allclose(l_gr, 2 * l_cc, atol=1e-12)
        assert torch.allclose(g_gr, 2 * g_cc, atol=1e-12)
        assert torch.allclose(p_gr["inter"], p_cc["centroid"]) and torch.allclose(p_gr["intra"], p_cc["centroid"])
        assert p_cc["inter"] == 0 and p_gr["centroid"] == 0
        cc.update(f, y)
        gr.update(f, y)


def test_build_relation_proxies_are_the_selected_members():
    feats, labels = toy()
    gr = GRACLLoss.build(feats, labels, C, w_centroid=0.5, inter_rule="knn_mean", intra_rule="farthest_pair", k=4)
    inter = inter_proxy_index(feats, labels, C, "knn_mean", k=4)
    intra = intra_proxy_index(feats, labels, C, "farthest_pair")
    assert torch.allclose(gr.memories["inter"].proxies, feats[inter])
    assert torch.allclose(gr.memories["intra"].proxies, feats[intra])
    assert torch.allclose(gr.memories["centroid"].proxies, centroids(feats, labels, C))
    assert [gr.memories[n].mode for n in ("centroid", "inter", "intra")] == ["mean", "outward", "hard"]
    f, y = batch(feats, labels, seed=0)
    total, parts = gr(f, y)
    assert torch.allclose(total, 0.5 * parts["centroid"] + parts["inter"] + parts["intra"])


# ----------------------------------------------------------------------------- 3. ProxyMemory


def memory_and_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mem = F.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=1)
    f = F.normalize(torch.randn(7, 6, generator=g, dtype=torch.float64), dim=1)
    y = torch.tensor([2, 0, 2, 1, 2, 0, 3])
    return mem, f, y


def test_forward_is_infonce():
    mem, f, y = memory_and_batch()
    pm = ProxyMemory(mem, tau=0.07)
    expected = 0.0
    for i in range(len(y)):
        logits = [float(f[i] @ mem[c]) / 0.07 for c in range(4)]
        expected += -(logits[y[i]] - math.log(sum(math.exp(v) for v in logits)))
    assert math.isclose(float(pm(f, y)), expected / len(y), rel_tol=1e-10)


def test_pull_loss_is_one_minus_cosine_to_own_proxy_only():
    mem, f, y = memory_and_batch()
    pm = ProxyMemory(mem, loss="pull")
    expected = sum(1.0 - float(f[i] @ mem[y[i]]) for i in range(len(y))) / len(y)
    assert math.isclose(float(pm(f, y)), expected, rel_tol=1e-10)
    moved = mem.clone()
    moved[3] = -moved[3]  # a proxy no sample belongs to does not matter to a pull (it would to InfoNCE)
    keep = y != 3
    assert float(ProxyMemory(moved, loss="pull")(f[keep], y[keep])) == float(pm(f[keep], y[keep]))
    assert float(ProxyMemory(moved)(f[keep], y[keep])) != float(ProxyMemory(mem)(f[keep], y[keep]))
    with pytest.raises(ValueError, match="loss"):
        ProxyMemory(mem, loss="hinge")


def test_no_gradient_into_memory():
    mem, f, y = memory_and_batch()
    pm = ProxyMemory(mem)
    assert list(pm.parameters()) == [] and not pm.proxies.requires_grad
    f = f.clone().requires_grad_(True)
    pm(f, y).backward()
    assert f.grad is not None and pm.proxies.grad is None
    assert "proxies" in pm.state_dict()


def manual_step(row, x, m):
    r = m * row + (1 - m) * x
    return r / r.norm()


def test_mean_update_is_sequential_cm():
    mem, f, y = memory_and_batch()
    pm = ProxyMemory(mem, momentum=0.3)
    pm.update(f, y, "mean")
    exp = mem.clone()
    for x, c in zip(f, y.tolist()):
        exp[c] = manual_step(exp[c], x, 0.3)
    assert torch.allclose(pm.proxies, exp, atol=1e-12)


def test_hard_update_uses_least_similar_sample():
    mem, f, y = memory_and_batch()
    pm = ProxyMemory(mem, momentum=0.1, mode="hard")
    pm.update(f, y)
    exp = mem.clone()
    for c in set(y.tolist()):
        members = [i for i in range(len(y)) if y[i] == c]
        i = min(members, key=lambda i: float(f[i] @ mem[c]))
        exp[c] = manual_step(mem[c], f[i], 0.1)
    assert torch.allclose(pm.proxies, exp, atol=1e-12)


def test_outward_update_uses_smallest_max_similarity_to_other_rows():
    mem, f, y = memory_and_batch(seed=1)
    pm = ProxyMemory(mem, momentum=0.1)
    pm.update(f, y, "outward")
    exp = mem.clone()
    chosen = {}
    for c in set(y.tolist()):
        members = [i for i in range(len(y)) if y[i] == c]
        i = min(members, key=lambda i: max(float(f[i] @ mem[o]) for o in range(4) if o != c))
        chosen[c] = i
        exp[c] = manual_step(mem[c], f[i], 0.1)
    assert torch.allclose(pm.proxies, exp, atol=1e-12)
    # the test is only meaningful if 'outward' and 'hard' disagree somewhere on this batch
    hard = ProxyMemory(mem, momentum=0.1)
    hard.update(f, y, "hard")
    assert not torch.allclose(hard.proxies, pm.proxies)


def test_none_update_and_unit_norm():
    mem, f, y = memory_and_batch()
    pm = ProxyMemory(mem, mode="none")
    before = pm.proxies.clone()
    pm.update(f, y)
    assert torch.equal(pm.proxies, before)
    for mode in ("mean", "hard", "outward"):
        pm.update(f * 3.0, y, mode)  # even unnormalised inputs keep rows unit-norm
        assert torch.allclose(pm.proxies.norm(dim=1), torch.ones(4, dtype=mem.dtype))
    with pytest.raises(ValueError):
        pm.update(f, y, "bogus")
    with pytest.raises(ValueError):
        ProxyMemory(mem, mode="bogus")
    with pytest.raises(ValueError):  # outliers must not reach the memory (-1 would hit the last row)
        pm.update(f, torch.tensor([0, -1, 1, 2, 3, 0, 1]), "mean")


# ----------------------------------------------------------------------------- 4. optimisation sanity


def test_training_reduces_gracl_loss():
    torch.manual_seed(0)
    feats, labels = toy(noise=0.8, dtype=torch.float32)
    x = torch.nn.Parameter(feats.clone())
    loss_fn = GRACLLoss.build(feats, labels, C, w_centroid=1.0, w_inter=1.0, w_intra=1.0)
    opt = torch.optim.Adam([x], lr=0.05)
    history = []
    for _ in range(40):
        f = F.normalize(x, dim=1)
        total, _ = loss_fn(f, labels)
        opt.zero_grad()
        total.backward()
        opt.step()
        loss_fn.update(F.normalize(x, dim=1).detach(), labels)
        history.append(total.item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.5 * history[0]


# ----------------------------------------------------------------------------- review fixes (issue 16)


def test_centroid_intra_rule_is_gone_because_it_duplicated_mean_similarity():
    feats, labels = toy(seed=5)
    with pytest.raises(ValueError, match="unknown intra rule"):
        intra_proxy_index(feats, labels, C, rule="centroid")
    # the reason: f_i . c ranks members as the mean similarity does, for every cluster
    cent = centroids(feats, labels, C)
    by_centroid = [max((i for i in range(len(labels)) if labels[i] == c), key=lambda i: -float(feats[i] @ cent[c]))
                   for c in range(C)]
    assert intra_proxy_index(feats, labels, C, "mean_similarity").tolist() == by_centroid


def test_farthest_pair_differs_from_mean_similarity():
    """Not a renamed duplicate: on the toy clusters the two rules pick different members somewhere."""
    picks = [(intra_proxy_index(f, y, C, "mean_similarity") != intra_proxy_index(f, y, C, "farthest_pair")).any()
             for f, y in (toy(seed=s) for s in range(6))]
    assert any(picks)


@pytest.mark.parametrize("rule", INTRA_RULES)
def test_two_member_cluster_intra_proxy_is_the_member_closer_to_other_clusters(rule):
    """Both members of a pair score the same (each one's only fellow is the other); the tie goes to the member
    nearer the other clusters, i.e. not the inter proxy, whatever the order or the float rounding."""
    g = torch.Generator().manual_seed(11)
    other = F.normalize(torch.randn(4, D, generator=g, dtype=torch.float64), dim=1)
    near = F.normalize(other[0] + 0.05 * torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    far = F.normalize(-other.sum(0) + 0.05 * torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    assert (other @ near).max() > 0.5 > (other @ far).max()
    for order in ([near, far], [far, near]):
        feats = torch.cat([torch.stack(order), other]).float()  # float32: rounding differs between the two
        labels = torch.tensor([0, 0, 1, 1, 1, 1])
        intra = intra_proxy_index(feats, labels, 2, rule)[0].item()
        inter = inter_proxy_index(feats, labels, 2)[0].item()
        assert torch.equal(feats[intra], near.float()) and intra != inter


def test_inter_negatives_centroids_contrast_against_other_clusters_centroids():
    feats, labels = toy(seed=6)
    f, y = batch(feats, labels, seed=1)
    loss = GRACLLoss.build(feats, labels, C, w_inter=1.0, w_intra=0.0, inter_negatives="centroids")
    memory = loss.memories["inter"]
    cent = centroids(feats, labels, C)
    expected = cent.clone().expand(len(y), -1, -1).clone()
    expected[torch.arange(len(y)), y] = memory.proxies[y]
    logits = torch.einsum("bd,bcd->bc", f, expected) / memory.tau
    assert torch.allclose(memory.logits(f, y), logits)
    assert torch.allclose(loss(f, y)[1]["inter"], F.cross_entropy(logits, y))
    plain = GRACLLoss.build(feats, labels, C, w_inter=1.0, w_intra=0.0)
    assert not torch.allclose(plain(f, y)[1]["inter"], loss(f, y)[1]["inter"])
    with pytest.raises(ValueError, match="inter negatives"):
        GRACLLoss.build(feats, labels, C, inter_negatives="members")


def test_proxy_momentum_keeps_the_global_choice():
    """With cluster-contrast's momentum 0.1 one update nearly replaces the chosen proxy; 0.9 keeps it."""
    feats, labels = toy(seed=7)
    f, y = batch(feats, labels, seed=2)
    kept = GRACLLoss.build(feats, labels, C, w_centroid=1.0, proxy_momentum=0.9)
    moved = GRACLLoss.build(feats, labels, C, w_centroid=1.0)
    chosen = kept.memories["inter"].proxies.clone()
    kept.update(f, y)
    moved.update(f, y)
    touched = torch.unique(y)
    keep_cos = (kept.memories["inter"].proxies[touched] * chosen[touched]).sum(1)
    move_cos = (moved.memories["inter"].proxies[touched] * chosen[touched]).sum(1)
    assert (keep_cos > move_cos).all()
    assert kept.memories["centroid"].momentum == moved.memories["centroid"].momentum == 0.1
