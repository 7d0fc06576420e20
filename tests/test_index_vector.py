import numpy as np
import pytest

from index.vector_index import VectorIndex


def rand(n, d=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_add_search_returns_self_first_with_cosine_scores():
    idx = VectorIndex(16)
    x = rand(50)
    ids = np.arange(1000, 1050, dtype=np.int64)
    idx.add(ids, x * 7.0)  # scale must not matter: vectors are normalised
    assert len(idx) == 50
    scores, got = idx.search(x[[3, 17]], 5)
    assert scores.shape == got.shape == (2, 5)
    assert got[0, 0] == 1003 and got[1, 0] == 1017
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    # brute-force check of the whole ranking
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    expect = ids[np.argsort(-(xn @ xn[3]))[:5]]
    assert list(got[0]) == list(expect)


def test_k_clipped_and_empty_index():
    idx = VectorIndex(8)
    s, i = idx.search(rand(2, 8), 10)
    assert s.shape == (2, 0) and i.shape == (2, 0) and i.dtype == np.int64
    idx.add([1, 2, 3], rand(3, 8))
    s, i = idx.search(rand(1, 8), 10)
    assert i.shape == (1, 3) and set(i[0]) == {1, 2, 3}


def test_remove_and_replace():
    idx = VectorIndex(16)
    x = rand(10)
    idx.add(np.arange(10), x)
    assert idx.remove([3, 4, 999]) == 2
    assert len(idx) == 8 and 3 not in idx and 5 in idx
    _, got = idx.search(x[3], 8)
    assert 3 not in got[0] and 4 not in got[0]
    # adding an existing id replaces its vector instead of duplicating it
    idx.add([5], x[0])
    assert len(idx) == 8
    s, got = idx.search(x[0], 2)
    assert set(got[0]) == {0, 5} and s[0, 1] == pytest.approx(1.0, abs=1e-5)


def test_wrong_dims_raise_clear_errors():
    idx = VectorIndex(16)
    with pytest.raises(ValueError, match=r"shape \(n, 16\)"):
        idx.add([1], rand(1, 15))
    with pytest.raises(ValueError, match="dimension 16"):
        idx.search(rand(1, 32), 3)
    with pytest.raises(ValueError, match="ids"):
        idx.add([1, 2], rand(3))
    with pytest.raises(ValueError, match="NaN"):
        idx.add([1], np.full((1, 16), np.nan, np.float32))
    with pytest.raises(ValueError):
        VectorIndex(0)


def test_save_load_roundtrip_atomic(tmp_path):
    idx = VectorIndex(16)
    x = rand(20)
    ids = np.random.default_rng(1).integers(1, 2**62, size=20, dtype=np.int64)
    idx.add(ids, x)
    path = tmp_path / "sub" / "g.faiss"
    idx.save(path)
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    back = VectorIndex.load(path)
    assert len(back) == 20 and back.dim == 16
    s1, i1 = idx.search(x[:4], 5)
    s2, i2 = back.search(x[:4], 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2)
    assert sorted(back.ids()) == sorted(ids)
    with pytest.raises(ValueError, match="dimension"):
        VectorIndex.load(path, dim=32)
    # the loaded index is fully usable (remove works on the id map)
    back.remove([ids[0]])
    assert len(back) == 19
