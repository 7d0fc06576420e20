"""bench/scale.py at a tiny size: the JSON it writes, recall measured against brute force over the stored
vectors (1.0 when every cell is probed and every vector re-ranked exactly), re-ranking never losing recall,
and `make bench`'s section reporting a saved result instead of running again. The features followed are made
here (identities seen by two cameras, five images each, on an anisotropic spectrum like real embeddings), so
the test needs neither the shared data nor the encoder."""

import json
from dataclasses import replace

import numpy as np
from PIL import Image

from bench import goals, plots, report, scale
from bench.config import QUICK
from bench.scale_data import PER_PERSON, FeatureGenerator

N = 20_000


def _features(ids: int = 60, dim: int = 256):
    rng = np.random.default_rng(0)
    spectrum = rng.standard_normal((dim, dim)) * np.geomspace(1.0, 0.05, dim)[:, None]
    centres = rng.standard_normal((ids, dim)) @ spectrum
    views = centres[:, None] + 0.5 * rng.standard_normal((ids, 2, dim)) @ spectrum
    x = views[:, :, None] + 0.6 * rng.standard_normal((ids, 2, 5, dim)) @ spectrum
    pids = np.repeat(np.arange(ids), 10)
    cams = np.tile(np.repeat([1, 2], 5), ids)
    return x.reshape(-1, dim).astype(np.float32), pids, cams


def test_generator_is_chunked_deterministic_and_labelled():
    x, pids, cams = _features()
    gen = FeatureGenerator(x, pids, cams, seed=3)
    rows = scale.ROWS + 3_000  # chunk 1 holds 3,000 vectors
    a, b = gen.chunk(1, rows), FeatureGenerator(x, pids, cams, seed=3).chunk(1, rows)
    assert a.shape == (3_000, 256) and np.array_equal(a, b) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert not np.array_equal(a, gen.chunk(0, rows)[:3_000])
    assert np.array_equal(gen.chunk(1, scale.ROWS + 1_234), a[:1_234])  # a short last chunk is a prefix
    q, persons = gen.queries(50, N, stream=1)
    assert q.shape == (50, 256) and persons.max() < N // PER_PERSON
    # a query is a new image of its person: nearer that person's gallery images than the rest on average
    g = gen.chunk(0, N)
    s = q @ g.T
    own = s[np.arange(50)[:, None], persons[:, None] * PER_PERSON + np.arange(PER_PERSON)].mean(1)
    assert (own > s.mean(1)).all()


def test_scale_run_measures_recall_against_exact(tmp_path):
    path = tmp_path / "scale-20k.json"
    r = scale.run(N, features=_features(), json_path=path, work_dir=tmp_path, queries=50, sweep_n=5_000,
                  sweep_m=(8,), sweep_cells=(1,), refines=(0, 8), log=lambda s: None)
    saved = json.loads(path.read_text())
    assert saved["n"] == N and saved["final"] == r["final"]
    assert not list(tmp_path.glob("reid-scale-*"))  # the float16 vectors are removed
    fin = saved["final"]
    assert 0 < fin["without_rerank"]["recall@10"] <= fin["with_rerank"]["recall@10"] <= 1
    assert fin["with_rerank"]["p99_ms"] >= fin["with_rerank"]["p50_ms"] > 0
    ix = saved["index"]
    assert ix["nlist"] == scale.base_nlist(N) and ix["pq_m"] == 8 and ix["train_s"] > 0 and ix["add_s"] > 0
    assert ix["memory"]["codes_and_ids_bytes"] == N * (8 + 8) and ix["index_bytes"] > 0
    assert ix["exact_vectors_float16_disk_bytes"] >= N * 256 * 2
    grid = {(p["refine"], p["nprobe"]): p["recall@10"] for p in saved["grid"]}
    common = [p for (refine, p) in grid if refine == 0 and (8, p) in grid]
    assert common and all(grid[(8, p)] >= grid[(0, p)] for p in common)  # re-ranking never loses recall
    assert saved["sweep"]["chosen"]["pq_m"] == 8 and saved["resemblance"]["synthetic_persons"] == 60

    # make bench's section reports the saved result rather than running again
    cfg = replace(QUICK, scale_n=N)
    cached = scale.section("unused-bundle", cfg, tmp_path, log=lambda s: None)
    assert cached["cached"] == str(path) and cached["final"] == saved["final"]
    text = "\n".join(report.scale_lines(cached))
    assert "held-out queries" in text and "Sweep at 5,000" in text
    assert {g["status"] for g in goals._scale_goals(cached)} <= {"met", "missed"}
    with Image.open(plots.scale_curve(cached, tmp_path / "curve.png")) as im:
        assert im.format == "PNG"


def test_recall_is_one_when_everything_is_probed_and_reranked(tmp_path):
    n = 5_000
    gen = FeatureGenerator(*_features())
    gallery = scale.Gallery(tmp_path / "v.npy", n, 256)
    gallery.write(gen)
    impl, _ = scale.build(gallery, n, nlist=16, m=8)
    q, _ = gen.queries(20, n)
    truth = scale.exact_top_k(gallery, q, scale.K)[1]
    points = scale.curve(impl, gallery.exact, q, truth, refines=(0, n // scale.K), nprobes=[16])
    pq_only, everything = (p["recall@10"] for p in points)
    assert everything == 1.0  # every vector fetched and re-ranked by its stored value = brute force
    assert pq_only < 1.0  # 8-byte codes lose neighbours: the figure is not vacuous
