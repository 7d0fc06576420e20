"""The procedural Market-1501-layout generator (models/synthetic.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.synthetic import (
    SPLITS,
    format_market_name,
    make_camera,
    make_identity,
    make_synthetic,
    parse_market_name,
)

REPO = Path(__file__).resolve().parents[1]

SMALL = dict(n_train_ids=8, n_test_ids=6, cameras=3, images_per_id_per_cam=2, seed=7, camera_coverage=0.7)


def _index(root: Path) -> dict[str, list[tuple[int, int, int, int, int]]]:
    return {s: [parse_market_name(p) for p in sorted((root / s).glob("*.jpg"))] for s in SPLITS}


def _digests(root: Path) -> dict[str, str]:
    return {
        f"{s}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for s in SPLITS for p in sorted((root / s).glob("*.jpg"))
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic") / "market"
    return root, make_synthetic(root, **SMALL)


def test_layout_and_names(small):
    root, summary = small
    for split in SPLITS:
        assert (root / split).is_dir()
        files = sorted((root / split).iterdir())
        assert files, split
        assert all(f.suffix == ".jpg" for f in files), split
        assert len(files) == summary["counts"][split]
        for f in files:
            pid, cam, seq, frame, det = parse_market_name(f.name)
            assert 1 <= cam <= SMALL["cameras"]
            assert seq >= 1 and frame >= 1 and det >= 0
            # round trip through the formatter
            assert format_market_name(pid, cam, seq, frame, det) == f.name
    assert summary["n_images"] == sum(summary["counts"].values())
    assert json.loads((root / "synthetic.json").read_text())["counts"] == summary["counts"]
    # file names are unique across the whole dataset (Market never repeats a name)
    names = [p.name for s in SPLITS for p in (root / s).glob("*.jpg")]
    assert len(names) == len(set(names))


def test_images_are_jpeg_of_requested_size(small):
    root, _ = small
    for split in SPLITS:
        for f in sorted((root / split).glob("*.jpg"))[:10]:
            with Image.open(f) as im:
                assert im.format == "JPEG"
                assert im.mode == "RGB"
                assert im.size == (64, 128)  # (width, height)


def test_custom_size(tmp_path):
    s = make_synthetic(tmp_path, n_train_ids=2, n_test_ids=2, cameras=2, images_per_id_per_cam=1, height=96, width=48)
    f = next((tmp_path / "query").glob("*.jpg"))
    with Image.open(f) as im:
        assert im.size == (48, 96)
    assert s["params"]["height"] == 96


def test_train_and_test_ids_disjoint(small):
    root, summary = small
    idx = _index(root)
    train = {m[0] for m in idx["bounding_box_train"]}
    gallery = {m[0] for m in idx["bounding_box_test"]} - {0, -1}
    query = {m[0] for m in idx["query"]}
    assert train == set(range(1, SMALL["n_train_ids"] + 1))
    assert gallery == set(range(SMALL["n_train_ids"] + 1, SMALL["n_train_ids"] + SMALL["n_test_ids"] + 1))
    assert not train & gallery
    assert query == gallery
    assert 0 not in train and -1 not in train and 0 not in query and -1 not in query


def test_every_id_seen_by_two_cameras(small):
    root, _ = small
    idx = _index(root)
    for split in ("bounding_box_train", "bounding_box_test"):
        cams = defaultdict(set)
        for pid, cam, *_ in idx[split]:
            if pid > 0:
                cams[pid].add(cam)
        assert cams and all(len(c) >= 2 for c in cams.values()), split


def test_queries_one_per_id_camera_with_cross_camera_match(small):
    root, _ = small
    idx = _index(root)
    gallery_cams = defaultdict(set)
    per_id_cam = defaultdict(int)
    for pid, cam, *_ in idx["bounding_box_test"]:
        if pid > 0:
            gallery_cams[pid].add(cam)
            per_id_cam[(pid, cam)] += 1
    assert all(n == SMALL["images_per_id_per_cam"] for n in per_id_cam.values())
    queries = [(pid, cam) for pid, cam, *_ in idx["query"]]
    assert len(queries) == len(set(queries)), "more than one query per (id, camera)"
    # exactly the (id, camera) pairs the gallery has
    assert set(queries) == set(per_id_cam)
    for pid, cam in queries:
        assert gallery_cams[pid] - {cam}, f"query {pid} c{cam} has no cross-camera gallery match"


def test_distractors_and_junk_only_in_gallery(small):
    root, summary = small
    idx = _index(root)
    gallery_pids = [m[0] for m in idx["bounding_box_test"]]
    assert gallery_pids.count(0) == summary["n_distractors"] >= 1
    assert gallery_pids.count(-1) == summary["n_junk"] >= 1
    assert any(p.name.startswith("-1_c") for p in (root / "bounding_box_test").glob("*.jpg"))
    assert any(p.name.startswith("0000_c") for p in (root / "bounding_box_test").glob("*.jpg"))
    for split in ("bounding_box_train", "query"):
        assert all(m[0] > 0 for m in idx[split]), split


def test_deterministic_for_a_seed(tmp_path):
    args = dict(n_train_ids=3, n_test_ids=3, cameras=3, images_per_id_per_cam=2, seed=11)
    make_synthetic(tmp_path / "a", **args)
    make_synthetic(tmp_path / "b", **args)
    da, db = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert da and da == db
    make_synthetic(tmp_path / "c", **{**args, "seed": 12})
    dc = _digests(tmp_path / "c")
    assert set(dc.values()) != set(da.values())


def test_identity_and_camera_are_pure_functions():
    assert make_identity(0, 5) == make_identity(0, 5)
    assert make_identity(0, 5) != make_identity(0, 6)
    assert make_identity(0, 5) != make_identity(1, 5)
    c1, c2 = make_camera(0, 1), make_camera(0, 1)
    assert c1.gain == c2.gain and np.array_equal(c1.background, c2.background)
    assert not np.array_equal(make_camera(0, 1).background, make_camera(0, 2).background)


def test_identities_vary():
    ids = [make_identity(0, pid) for pid in range(1, 201)]
    assert len({i.top for i in ids}) > 150  # jittered colours
    assert {i.pattern for i in ids} == {"plain", "hstripes", "vstripes", "checks", "logo"}
    assert {i.bottom_type for i in ids} == {"trousers", "shorts", "skirt"}
    assert any(i.backpack for i in ids) and any(i.bag for i in ids) and any(i.hat for i in ids)
    assert any(i.backpack is None for i in ids)


def test_same_identity_differs_across_cameras(small):
    root, _ = small
    by_id = defaultdict(list)
    for f in sorted((root / "bounding_box_train").glob("*.jpg")):
        by_id[parse_market_name(f.name)[0]].append(f)
    files = next(iter(by_id.values()))
    arrays = [np.asarray(Image.open(f), dtype=np.float32) for f in files]
    assert all(np.abs(a - arrays[0]).mean() > 2.0 for a in arrays[1:])


def test_reuse_and_overwrite(tmp_path):
    args = dict(n_train_ids=2, n_test_ids=2, cameras=2, images_per_id_per_cam=1)
    first = make_synthetic(tmp_path, **args)
    assert first["reused"] is False
    again = make_synthetic(tmp_path, **args)
    assert again["reused"] is True and again["counts"] == first["counts"]
    with pytest.raises(FileExistsError):
        make_synthetic(tmp_path, **{**args, "seed": 3})
    third = make_synthetic(tmp_path, **{**args, "seed": 3}, overwrite=True)
    assert third["reused"] is False and third["params"]["seed"] == 3


def test_refuses_foreign_files(tmp_path):
    (tmp_path / "query").mkdir()
    (tmp_path / "query" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_synthetic(tmp_path, n_train_ids=2, n_test_ids=2, cameras=2, images_per_id_per_cam=1)
    assert (tmp_path / "query" / "mine.txt").exists()


@pytest.mark.parametrize(
    "kwargs",
    [dict(cameras=1), dict(cameras=10), dict(n_test_ids=0), dict(images_per_id_per_cam=0), dict(camera_coverage=0.0)],
)
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_synthetic(tmp_path, **kwargs)


@pytest.mark.parametrize("bad", ["0001_c1_000001_00.jpg", "1_c1s1_000001_00.jpg", "0001_c1s1_000001_00.png", "x.jpg"])
def test_parse_rejects_bad_names(bad):
    with pytest.raises(ValueError):
        parse_market_name(bad)


def test_parse_market_names():
    assert parse_market_name("0001_c1s1_000001_00.jpg") == (1, 1, 1, 1, 0)
    assert parse_market_name("-1_c3s2_001234_03.jpg") == (-1, 3, 2, 1234, 3)
    assert parse_market_name(Path("/x/0000_c6s4_002202_01.jpg")) == (0, 6, 4, 2202, 1)
    assert format_market_name(-1, 2, 1, 5, 1) == "-1_c2s1_000005_01.jpg"
    assert format_market_name(0, 2, 1, 5) == "0000_c2s1_000005_00.jpg"


def test_speed_sanity(tmp_path):
    """About 500 images; generous bound (typically ~2-3 ms per image), so a loaded machine passes."""
    s = make_synthetic(tmp_path, n_train_ids=30, n_test_ids=15, cameras=4, images_per_id_per_cam=2)
    assert s["n_images"] >= 400
    assert s["seconds"] / s["n_images"] < 0.05


def test_module_does_not_import_torch():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('synthetic', {str(REPO / 'models' / 'synthetic.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['synthetic'] = m; spec.loader.exec_module(m)\n"
        "assert 'torch' not in sys.modules, 'models/synthetic.py imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
