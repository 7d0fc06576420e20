"""Index snapshots and their manifest (index/snapshot.py), and where the change log leaves gaps (index/events.py)."""

from __future__ import annotations

import json

import numpy as np
import redis

from index.events import ZERO, StreamInfo, read_range, stream_info
from index.snapshot import Manifest, load_snapshot, read_manifest, touch_manifest, write_snapshot
from index.store import RedisStore
from index.vector_index import VectorIndex


def _index(n: int, dim: int = 8) -> VectorIndex:
    idx = VectorIndex(dim)
    idx.add(np.arange(n), np.random.default_rng(n).normal(size=(n, dim)).astype(np.float32))
    return idx


def _manifest(**kw) -> Manifest:
    base = dict(gallery="g", bundle_id="default", model="m:1", dim=8, count=0, stream_id="5-0",
                index_settings={"index_type": "flat"})
    return Manifest(**{**base, **kw})


def test_snapshot_round_trip_and_refusals(tmp_path):
    idx = _index(50)
    m = write_snapshot(tmp_path, idx, _manifest())
    assert m.count == 50 and m.index_bytes == (tmp_path / "g.faiss").stat().st_size
    assert json.loads((tmp_path / "g.json").read_text())["stream_id"] == "5-0"
    ok = dict(model="m:1", dim=8, index_settings={"index_type": "flat"})
    got, man, why = load_snapshot(tmp_path, "g", **ok)
    assert why == "ok" and len(got) == 50 and man.stream_id == "5-0"
    np.testing.assert_array_equal(np.sort(got.ids()), np.arange(50))

    assert load_snapshot(tmp_path, "other", **ok)[0] is None  # none written
    assert "model" in load_snapshot(tmp_path, "g", **{**ok, "model": "m:2"})[2]
    assert "index settings" in load_snapshot(tmp_path, "g", **{**ok, "index_settings": {"index_type": "hnsw"}})[2]
    # a crash between the two renames: a new index file beside the old manifest
    _index(60).save(tmp_path / "g.faiss")
    got, _, why = load_snapshot(tmp_path, "g", **ok)
    assert got is None and "torn" in why


def test_touch_manifest_moves_only_the_position(tmp_path):
    write_snapshot(tmp_path, _index(3), _manifest())
    assert touch_manifest(tmp_path, "g", "9-1")
    m = read_manifest(tmp_path, "g")
    assert m.stream_id == "9-1" and m.count == 3
    assert not touch_manifest(tmp_path, "nope", "9-1")


def test_gap_after():
    info = StreamInfo(exists=True, first="100-0", last="200-3", length=50)
    assert not info.gap_after("150-0", 1000)  # within the log
    assert not info.gap_after("100-0", 1000)
    assert info.gap_after("99-5", 1000)  # trimmed past it
    assert info.gap_after("300-0", 1000)  # newer than anything the log generated: Redis lost writes
    assert not info.gap_after(ZERO, 1000)  # from an empty log, never trimmed (shorter than the cap)
    assert info.gap_after(ZERO, 50)  # ... unless it reached the cap
    assert StreamInfo(exists=False, first=None, last=ZERO).gap_after("5-0", 1000)
    assert not StreamInfo(exists=False, first=None, last=ZERO).gap_after(ZERO, 1000)


def test_change_log_is_written_with_each_change_and_trimmed(redis_url):
    store = RedisStore(redis_url, events_maxlen=1000)
    vec = np.ones(4, np.float32)
    store.put_many("g", [(i, vec, None) for i in range(1, 4)])
    store.delete("g", 2)
    log = store.k_gallery_events("g")  # the gallery's own change log
    events = [e for batch in read_range(store.r, log, ZERO, store.log_positions(["g"])["g"], "g") for e in batch]
    assert [(e.op, e.gallery, e.ref) for e in events] == [("put", "g", "1"), ("put", "g", "2"), ("put", "g", "3"),
                                                          ("delete", "g", "2")]
    after = events[1].id
    assert [e.ref for b in read_range(store.r, log, after, events[-1].id) for e in b] == ["3", "2"]
    for start in range(0, 3000, 500):
        store.put_many("g", [(10 + i, vec, None) for i in range(start, start + 500)])
    info = stream_info(store.r, log)
    assert info.length < 2000 and info.gap_after(after, 1000)  # approximate MAXLEN trimmed the head
    assert stream_info(redis.Redis.from_url(redis_url), "reid:none").exists is False
    store.close()
