"""Dataset readers and the one split definition."""

from pathlib import Path

import numpy as np
import pytest

from index.metrics import evaluate_rankings
from models.data.datasets import (
    SHARED_READERS, combine_for_training, cuhk03_camera, custom_folder, load_dataset, market1501, split_identities,
)
from tests.shared_data import require_shared_data


def test_split_is_a_pure_function_of_the_seed():
    a = split_identities(range(100), 50, seed=3)
    assert a == split_identities(list(reversed(range(100))), 50, seed=3)
    assert a != split_identities(range(100), 50, seed=4)
    train, test = a
    assert len(train) == 50 and not set(train) & set(test) and set(train) | set(test) == set(range(100))


def test_cuhk03_cameras_follow_the_pair_table():
    assert cuhk03_camera(0, 0) == 1 and cuhk03_camera(842, 9) == 2
    assert cuhk03_camera(843, 4) == 3 and cuhk03_camera(1466, 5) == 10


@pytest.mark.parametrize("name, n_query, n_gallery, n_train", [
    ("prid2011", 100, 649, 200), ("prid450s", 225, 225, 450), ("viper", 158, 158, 316),
    ("cuhk01", 972, 972, 1940), ("pku-reid", 296, 296, 592),
])
def test_single_shot_protocols(name, n_query, n_gallery, n_train):
    require_shared_data()
    ds = load_dataset(name, 0)
    assert (len(ds.query), len(ds.gallery), len(ds.train)) == (n_query, n_gallery, n_train)
    assert {s.camid for s in ds.query} == {1} and {s.camid for s in ds.gallery} == {2}
    assert not {s.pid for s in ds.train} & {s.pid for s in ds.query}
    assert all(Path(s.path).exists() for s in ds.query[:5])


def test_prid2011_gallery_has_the_549_distractors():
    require_shared_data()
    ds = load_dataset("prid2011", 0)
    assert sum(s.pid > 200 for s in ds.gallery) == 549
    assert {s.pid for s in ds.query} == {s.pid for s in ds.gallery if s.pid <= 200}


def test_cuhk03_multishot_protocol():
    require_shared_data()
    ds = load_dataset("cuhk03", 0)
    test_ids = {s.pid for s in ds.query}
    assert len(test_ids) == 350 and len({s.pid for s in ds.train}) == 767
    assert not test_ids & {s.pid for s in ds.train}
    # one query per (identity, camera), the lowest-numbered image
    keys = [(s.pid, s.camid) for s in ds.query]
    assert len(keys) == len(set(keys))
    for q in ds.query[:20]:
        same = [g for g in ds.gallery if (g.pid, g.camid) == (q.pid, q.camid)]
        assert all(Path(g.path).name > Path(q.path).name for g in same)


def test_market_layout_and_custom_folder(tmp_path):
    for folder, names in {
        "bounding_box_train": ["0002_c1s1_000001_00.jpg", "0002_c2s1_000002_00.jpg"],
        "bounding_box_test": ["0003_c1s1_000001_00.jpg", "-1_c2s1_000001_00.jpg", "0000_c1s1_000009_00.jpg"],
        "query": ["0003_c2s1_000003_00.jpg"],
    }.items():
        (tmp_path / folder).mkdir()
        for n in names:
            (tmp_path / folder / n).write_bytes(b"x")
    ds = market1501(tmp_path)
    assert [s.pid for s in ds.train] == [2, 2] and {s.camid for s in ds.train} == {1, 2}
    assert sorted(s.pid for s in ds.gallery) == [-1, 0, 3]  # junk and distractor kept: the evaluator decides
    assert custom_folder(tmp_path).name == ds.name
    flat = custom_folder(tmp_path / "bounding_box_train")
    assert len(flat.train) == 2

    # Market's rule on what the reader gives: the junk (-1) ranked first is ignored, the distractor (0000)
    # ranked next is a wrong answer, so the true match is at rank 2
    distance = {-1: 0.0, 0: 0.1, 3: 0.2}
    m = evaluate_rankings(np.array([[distance[s.pid] for s in ds.gallery]]),
                          np.array([s.pid for s in ds.query]), np.array([s.pid for s in ds.gallery]),
                          np.array([s.camid for s in ds.query]), np.array([s.camid for s in ds.gallery]))
    assert m.ranks["rank1"] == 0.0 and m.cmc[1] == 1.0 and m.mAP == pytest.approx(0.5)


@pytest.mark.parametrize("name", sorted(SHARED_READERS))
def test_shared_protocols_evaluate_no_junk_or_distractor_ids(name):
    """The reported splits (0-2) of the shared protocols hold no id 0 or -1 in their query or gallery, so
    Market's junk/distractor rule never touches their figures (CUHK03 numbers a real person 0, who falls
    in the test half of some later splits)."""
    require_shared_data()
    for split in (0, 1, 2):
        ds = load_dataset(name, split)
        assert min(s.pid for s in ds.query + ds.gallery) > 0, (name, split)


def test_combined_training_sets_never_collide():
    require_shared_data()
    samples, names = combine_for_training([load_dataset("prid2011", 0), load_dataset("viper", 0)])
    assert len(names) == 100 + 158 and {s.pid for s in samples} == set(range(len(names)))
    assert len({s.camid for s in samples}) == 4


@pytest.mark.parametrize("name, images, ids", [("cuhk01-all", 3884, 971), ("pku-reid-all", 1184, 74),
                                                ("viper-all", 632, 316)])
def test_whole_sets_for_training(name, images, ids):
    require_shared_data()
    ds = load_dataset(name)
    assert (len(ds.train), len({s.pid for s in ds.train})) == (images, ids)
    assert not ds.query and not ds.gallery
    cameras = {}
    for s in ds.train:
        cameras.setdefault(s.pid, set()).add(s.camid)
    assert all(c == {1, 2} for c in cameras.values())  # every person seen by both cameras


def test_whole_set_is_offered_only_where_it_is_honest():
    with pytest.raises(FileNotFoundError):
        load_dataset("prid2011-all")  # its B-only people have no match; PRID450S shares its people
