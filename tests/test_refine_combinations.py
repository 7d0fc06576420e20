"""The combination study (models/refine_combinations.py) ranks what it says it ranks: with an NFormer that
changes nothing, NFormer-then-k-reciprocal is k-reciprocal and `local` is the cosine, on the same K
candidates as the service's modes."""

import numpy as np

from index.refine import Refiner
from models import refine_combinations as combos


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(seed=0, people=30, shots=4, dim=16):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((people, dim))
    gallery = _unit(np.repeat(centres, shots, axis=0) + 0.4 * rng.standard_normal((people * shots, dim)))
    query = _unit(centres[:5] + 0.4 * rng.standard_normal((5, dim)))
    return query, gallery


def test_identity_nformer_reduces_combinations_to_their_parts():
    query, gallery = _data()
    refiner = Refiner(_unit, k1=6, k2=3)  # an NFormer that only re-normalises
    k = 40
    cosine = query @ gallery.T
    local = combos.variant_similarities(refiner, "local", query, gallery, k)
    krec = combos.variant_similarities(refiner, "kreciprocal", query, gallery, k)
    chained = combos.variant_similarities(refiner, "local>kreciprocal", query, gallery, k)
    fused = combos.variant_similarities(refiner, "mean(local, kreciprocal)", query, gallery, k)
    for qi in range(len(query)):
        ids = refiner.with_candidates(k).candidate_ids(cosine[qi], gallery)
        outside = np.setdiff1d(np.arange(len(gallery)), ids)
        np.testing.assert_allclose(local[qi, ids], cosine[qi, ids], atol=1e-5)
        np.testing.assert_allclose(local[qi, outside], cosine[qi, outside] - 10.0, atol=1e-6)
        np.testing.assert_allclose(chained[qi, ids], krec[qi, ids], atol=1e-5)
        np.testing.assert_allclose(fused[qi, ids], 0.5 * (local[qi, ids] + krec[qi, ids]), atol=1e-5)
        assert not np.allclose(krec[qi, ids], cosine[qi, ids])  # k-reciprocal does re-rank


def test_nformer_on_kreciprocal_candidates_keeps_k_of_a_wider_set():
    query, gallery = _data(seed=1)
    refiner = Refiner(_unit, k1=6, k2=3)
    k = 20
    scores = combos.variant_similarities(refiner, "kreciprocal>local", query, gallery, k)
    cosine = query @ gallery.T
    for qi in range(len(query)):
        kept = np.flatnonzero(scores[qi] > -5.0)
        assert len(kept) == k
        wide = refiner.with_candidates(int(round(combos.WIDEN * k))).candidate_ids(cosine[qi], gallery)
        assert set(kept) <= set(wide)
