"""refine=auto's statistic and its owner, on real FAISS indexes: galleries where each person has near twins
read as multi-shot, galleries of strangers do not, whatever their size; decisions are remade when stale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.gallery_profile import MIN_ITEMS, choose_refine, profile_gallery, stranger_kth_z
from index.vector_index import VectorIndex
from service.refine_auto import RefineAdvisor

DIM = 64


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def strangers(n: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, DIM)))


def tracks(people: int, shots: int, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """`shots` images of each person: the person's direction plus noise (a track's frames)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((people, DIM))
    return unit(np.repeat(centres, shots, axis=0) + spread * rng.standard_normal((people * shots, DIM)))


def index_of(vectors: np.ndarray) -> VectorIndex:
    return VectorIndex.from_vectors(np.arange(len(vectors)), vectors)


@pytest.mark.parametrize("n,k", [(10, 1), (1000, 1), (1000, 3), (300, 5)])
def test_stranger_kth_z_is_the_median_kth_largest_gaussian_draw(n, k):
    draws = -np.sort(-np.random.default_rng(n + k).standard_normal((2000, n)), axis=1)[:, k - 1]
    assert stranger_kth_z(n, k) == pytest.approx(np.median(draws), abs=0.05)


def test_stranger_kth_z_grows_with_n_and_falls_with_k():
    assert stranger_kth_z(1000, 3) < stranger_kth_z(1_000_000, 3) < np.sqrt(2 * np.log(1_000_000))
    assert stranger_kth_z(1000, 1) > stranger_kth_z(1000, 3) > stranger_kth_z(1000, 5)


@pytest.mark.parametrize("n", [120, 600, 3000])
def test_strangers_and_pairs_read_single_shot_and_tracks_multi_shot(n):
    alone = profile_gallery(strangers(n), n)
    pairs = profile_gallery(tracks(n // 2, 2), n)  # two views per person: one twin is not enough to refine
    twins = profile_gallery(tracks(n // 5, 5), n)
    assert alone.neighbour_excess < 0.3 and pairs.neighbour_excess < 0.3, (alone, pairs)
    assert twins.neighbour_excess > 1.0, twins
    assert [choose_refine(p, 0.3, "kreciprocal") for p in (alone, pairs, twins)] == ["none", "none", "kreciprocal"]


def test_sample_with_index_search_agrees_with_the_whole_gallery():
    vectors = tracks(400, 5)
    whole = profile_gallery(vectors, len(vectors))
    advisor = RefineAdvisor("kreciprocal", 0.3, sample=500)
    sampled = advisor.decide("g", index_of(vectors), "m1").profile
    assert sampled.sampled == 500 and sampled.items == 2000
    assert sampled.neighbour_excess == pytest.approx(whole.neighbour_excess, abs=0.3)


def test_advisor_remakes_stale_decisions_only():
    advisor = RefineAdvisor("local", 0.3)
    idx = index_of(strangers(MIN_ITEMS))
    first = advisor.decide("g", idx, "m1")
    assert first.mode == "none" and advisor.decide("g", idx, "m1") is first  # cached
    idx.add(np.arange(100, 105), strangers(5, seed=1))  # +5%: same decision
    assert advisor.decide("g", idx, "m1") is first
    assert advisor.decide("g", idx, "m2") is not first  # another model's features
    twins = tracks(40, 5, seed=2)
    idx.add(np.arange(105, 305), twins)  # the gallery became mostly tracks
    now = advisor.decide("g", idx, "m2")
    assert now.profile.items == 305 and now.mode == "local"
    assert advisor.decide("g", idx, "m2", has_nformer=False) is now  # cached decisions stay as made
    advisor.forget("g")
    assert advisor.decide("g", idx, "m2", has_nformer=False).mode == "kreciprocal"  # no NFormer: kreciprocal


def test_default_auto_mode_is_local_kreciprocal_and_needs_the_nformer():
    from service.settings import RefineMode, Settings

    mode = Settings().refine_auto_mode
    assert mode == "local_kreciprocal" and RefineMode(mode).needs_nformer
    advisor = RefineAdvisor(mode, 0.3)
    idx = index_of(tracks(40, 5, seed=4))
    assert advisor.decide("g", idx, "m").mode == "local_kreciprocal"
    assert advisor.decide("g", idx, "m2", has_nformer=False).mode == "kreciprocal"  # no NFormer: kreciprocal


def test_tiny_or_missing_galleries_are_not_refined():
    advisor = RefineAdvisor("kreciprocal", 0.3)
    assert advisor.decide("none", None, "m").mode == "none"
    small = index_of(tracks(19, 5))
    decision = advisor.decide("small", small, "m")
    assert len(small) < MIN_ITEMS and decision.mode == "none" and decision.profile is None
    small.add(np.arange(95, 120), tracks(5, 5, seed=3))
    assert advisor.decide("small", small, "m").profile is not None  # enough items now: decided afresh
    assert advisor.decide("small", small, "m").to_dict()["profile"]["items"] == 120


# ---------------------------------------------------------------- over HTTP, the shipped model, real galleries
def _gallery_of(dataset, people: int):
    keep = sorted({s.pid for s in dataset.gallery})[:people]
    return [s for s in dataset.gallery if s.pid in keep]


def test_auto_over_http_refines_track_galleries_and_leaves_single_shot_ones(server_factory):
    """A CUHK03 gallery (about 5 images per person, unseen identities) reads multi-shot and gets the default
    auto mode, local_kreciprocal, whose answer auto's then is exactly; a PRID450S gallery (one image per
    person) is not refined, and auto's answer is then exactly none's."""
    import httpx

    from models.data.datasets import load_dataset
    from service.client import ReidClient
    from service.settings import DEFAULT_BUNDLE_DIR, Settings
    from tests.shared_data import require_shared_data

    require_shared_data()
    server = server_factory(model_dir=DEFAULT_BUNDLE_DIR, refine_default="auto")
    assert isinstance(server.settings, Settings)
    client = ReidClient(server.url)
    tracks_ds, singles_ds = load_dataset("cuhk03", 0), load_dataset("prid450s", 0)
    for gallery, samples in (("tracks", _gallery_of(tracks_ds, 24)), ("singles", _gallery_of(singles_ds, 150))):
        client.ingest(gallery, [s.path for s in samples])

    detail = {g: httpx.get(f"{server.url}/v1/galleries/{g}").json()["refine_auto"] for g in ("tracks", "singles")}
    assert detail["tracks"]["mode"] == "local_kreciprocal" and detail["singles"]["mode"] == "none", detail
    threshold = server.settings.refine_auto_threshold
    assert detail["tracks"]["profile"]["neighbour_excess"] >= threshold > detail["singles"]["profile"]["neighbour_excess"]
    assert "neighbour_excess" in detail["tracks"]["rule"]

    query = Path(tracks_ds.query[0].path).read_bytes()
    answer = client.search("tracks", query, refine=None)  # the server's default: auto
    assert answer.refine == "auto" and answer.refine_applied == "local_kreciprocal" and answer.candidates == 200
    chosen, plain = (client.search("tracks", query, refine=mode) for mode in ("local_kreciprocal", "kreciprocal"))
    assert [(r.id, r.score, r.cosine) for r in answer.results] == [(r.id, r.score, r.cosine) for r in chosen.results]
    assert [r.score for r in answer.results] != [r.score for r in plain.results]  # not kreciprocal's answer
    single_query = Path(singles_ds.query[0].path).read_bytes()
    auto, none = (client.search("singles", single_query, refine=mode) for mode in ("auto", "none"))
    assert auto.refine_applied == "none" and none.refine_applied == "none"
    assert [(r.id, r.score) for r in auto.results] == [(r.id, r.score) for r in none.results]
