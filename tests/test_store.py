import threading
import time

import numpy as np
import pytest

from index.store import (GalleryModelMismatch, InvalidGalleryName, RedisStore, StagingStale, image_id,
                         validate_gallery_name)


@pytest.fixture
def store(redis_url):
    s = RedisStore(redis_url)
    yield s
    s.close()


def vec(seed, d=8):
    return np.random.default_rng(seed).normal(size=d).astype(np.float32)


def test_image_id_stable_positive_and_per_gallery():
    a = image_id("g1", b"hello")
    assert a == image_id("g1", b"hello")
    assert 0 < a < 2**63
    assert a != image_id("g2", b"hello")
    assert a != image_id("g1", b"hello!")


@pytest.mark.parametrize("name", ["a", "Gallery_1.v2-x", "0" * 64])
def test_valid_gallery_names(name):
    assert validate_gallery_name(name) == name


@pytest.mark.parametrize("name", ["", "_a", "-a", "a b", "a:b", "a/b", "a" * 65, "é"])
def test_invalid_gallery_names(name):
    with pytest.raises(InvalidGalleryName):
        validate_gallery_name(name)


def test_put_get_exists_delete(store, gallery_name):
    g = gallery_name
    i = image_id(g, b"img1")
    assert not store.gallery_exists(g)
    assert store.put(g, i, vec(1), {"camera_id": 3, "person_id": "p7", "external_id": "e1",
                                    "captured_at": "2024-01-02T03:04:05Z", "bogus": "x"},
                     model="m:1") is False
    assert store.gallery_exists(g) and g in store.list_galleries()
    assert store.exists(g, i)
    rec = store.get(g, i)
    assert rec.id == i and rec.metadata["camera_id"] == "3" and rec.metadata["person_id"] == "p7"
    assert rec.metadata["external_id"] == "e1" and rec.metadata["model"] == "m:1"
    assert rec.metadata["created_at"] and "bogus" not in rec.metadata
    np.testing.assert_array_equal(store.get_vector(g, i), vec(1))
    # second put of the same id reports existing and does not overwrite
    assert store.put(g, i, vec(2), {"camera_id": "9"}) is True
    assert store.get(g, i).metadata["camera_id"] == "3"
    np.testing.assert_array_equal(store.get_vector(g, i), vec(1))
    assert store.gallery_info(g)["count"] == 1
    assert store.delete(g, i) is True
    assert store.delete(g, i) is False
    assert store.get(g, i) is None and store.get_vector(g, i) is None
    assert store.gallery_info(g)["count"] == 0
    assert store.gallery_info("does-not-exist-xyz") is None


def test_iter_vectors_batches_everything(store, gallery_name):
    g = gallery_name
    ids = [image_id(g, str(n).encode()) for n in range(257)]
    # records past 64 bytes: a real hash table, which HSCAN walks a part at a time (a small one comes whole)
    for n, i in enumerate(ids):
        store.put(g, i, vec(n), {"external_id": f"site-7/cam-03/2024-05-01/{n:08d}",
                                 "filename": f"{n:04d}_c3s1_{n * 7:06d}_00.jpg"})
    seen = {}
    batches = 0
    for bid, bvec in store.iter_vectors(g, batch=50):
        assert bid.dtype == np.int64 and bvec.dtype == np.float32 and bvec.shape == (len(bid), 8)
        batches += 1
        seen.update(zip(bid.tolist(), bvec))
    assert batches >= 6 and set(seen) == set(ids)
    np.testing.assert_array_equal(seen[ids[5]], vec(5))


def test_delete_gallery_removes_all_keys(store, gallery_name):
    g = gallery_name
    for n in range(30):
        store.put(g, image_id(g, bytes([n])), vec(n), {"camera_id": "1"})
    assert store.delete_gallery(g, batch=7) is True
    assert not store.gallery_exists(g)
    assert list(store.r.scan_iter(match=store.k_gallery(g) + "*")) == []
    assert store.delete_gallery(g) is False


def test_concurrent_puts_of_same_image_create_once(store, gallery_name):
    g = gallery_name
    i = image_id(g, b"same")
    results = []
    barrier = threading.Barrier(8)

    def worker():
        s = RedisStore(store.r)  # redis-py clients are thread-safe (connection pool)
        barrier.wait()
        results.append(s.put(g, i, vec(0)))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] + [True] * 7


def test_ping(store):
    assert store.ping() is True


def test_put_many_one_transaction_reports_existing(store, gallery_name):
    g = gallery_name
    store.put(g, 1, vec(1), {"camera_id": "a"})
    out = store.put_many(g, [(1, vec(9), {"camera_id": "z"}), (2, vec(2), {"camera_id": "b"}),
                             (3, vec(3), None), (2, vec(8), None)])
    assert out == [True, False, False, True]
    assert store.count(g) == 3
    assert store.get(g, 1).metadata["camera_id"] == "a"
    np.testing.assert_array_equal(store.get_vector(g, 2), vec(2))
    events = store.r.xrange(store.k_gallery_events(g))  # the gallery's own log: one entry per image created
    assert [(e[1][b"op"], e[1][b"id"]) for e in events] == [(b"put", b"1"), (b"put", b"2"), (b"put", b"3")]
    listed = [(e[1][b"op"], e[1][b"gallery"]) for e in store.r.xrange(store.k_events())]
    assert listed.count((b"create", g.encode())) == 1  # the global log: the gallery came into being once


def test_image_bytes_kept_with_image_and_removed_with_it(store, gallery_name):
    g = gallery_name
    blobs = {image_id(g, bytes([n]) * 10): bytes([n]) * 10 for n in range(5)}
    ids = list(blobs)
    out = store.put_many(g, [(i, vec(n), {"camera_id": f"c{n % 2}"}) for n, i in enumerate(ids)],
                         images=[blobs[i] for i in ids])
    assert out == [False] * 5 and store.count_images(g) == 5
    assert store.get_image_bytes(g, ids[:2]) == [blobs[ids[0]], blobs[ids[1]]]
    store.put(g, 7, vec(7))  # no bytes given: none kept
    assert store.count_images(g) == 5 and store.get_image_bytes(g, [7]) == [None]
    assert store.delete(g, ids[0]) is True
    assert store.get_image_bytes(g, [ids[0]]) == [None] and store.count_images(g) == 4
    assert store.delete_gallery(g) is True
    assert not store.r.exists(store.k_images(g))


def test_iter_images_batches_ids_bytes_and_cameras(store, gallery_name):
    g = gallery_name
    records, blobs = [], []
    for n in range(23):
        data = f"image-{n}".encode()
        records.append((image_id(g, data), vec(n), {"camera_id": str(n % 3)} if n else None))
        blobs.append(data)
    store.put_many(g, records, images=blobs)
    batches = list(store.iter_images(g, batch=5))
    assert len(batches) >= 5 and all(1 <= len(b) <= 5 for b in batches)
    got = {i: (data, cam) for b in batches for i, data, cam in b}
    assert got == {i: (data, None if n == 0 else str(n % 3))
                   for n, ((i, _, _), data) in enumerate(zip(records, blobs))}


def test_commit_staged_swaps_vectors_atomically_or_refuses(store, gallery_name):
    g = gallery_name
    store.put_many(g, [(1, vec(1), None), (2, vec(2), None)], model="old:1")
    store.clear_staged(g)
    store.stage_vectors(g, [1], np.stack([vec(11, d=4)]))
    with pytest.raises(StagingStale):  # image 2 not staged yet
        store.commit_staged([g], "new:1", "copy-1")
    assert store.active_bundle() is None and store.get_vector(g, 1).shape == (8,)
    store.stage_vectors(g, [2, 3], np.stack([vec(12, d=4), vec(13, d=4)]))
    store.unstage(g, [3])
    store.commit_staged([g], "new:1", "copy-1")
    assert store.active_bundle() == "copy-1" and not store.r.exists(store.k_staged(g))
    np.testing.assert_array_equal(store.get_vector(g, 2), vec(12, d=4))
    assert store.get(g, 1).metadata["model"] == "new:1" and store.get_vector(g, 1).shape == (4,)


# ---------------------------------------------------------------------------- what the service asks of the store


def test_counts_and_the_gallery_listing(store):
    store.put_many("a", [(1, vec(1), None), (2, vec(2), None)], images=[b"one", None])
    store.put_many("b", [(3, vec(3), None)], images=[b"three"])
    store.create_gallery("empty", retention_days=7)
    assert store.counts() == {"a": 2, "b": 1, "empty": 0}
    assert store.counts(["b", "nope"]) == {"b": 1, "nope": 0}
    assert store.images_without_bytes() == {"a": 1}  # image 2's bytes were not kept
    listed = store.list_gallery_info()
    assert [g["name"] for g in listed] == ["a", "b", "empty"]
    assert listed == [store.gallery_info(g) for g in ("a", "b", "empty")]
    assert listed[2]["retention_days"] == 7 and listed[0]["retention_days"] is None


def test_counts_and_listings_are_read_at_a_position_of_their_log(store):
    assert store.galleries_at_log_position() == (set(), "0-0")  # nothing logged yet
    assert store.count_at_log_position("a") == (0, "0-0")
    store.put_many("a", [(1, vec(1), None), (2, vec(2), None)])
    store.delete("a", 1)
    store.put("b", 3, vec(3))
    galleries, last = store.galleries_at_log_position()
    assert galleries == {"a", "b"} and last == store.log_positions()[""]
    assert [(e.op, e.gallery) for batch in store.read_events("", "0-0", last) for e in batch] == [
        ("create", "a"), ("create", "b")]
    n, last_a = store.count_at_log_position("a")
    assert n == 1 and last_a == store.log_positions(["a"])["a"] == store.change_log_info("a").last
    assert [(e.op, e.gallery, e.ref, e.stream) for batch in store.read_events("a", "0-0", last_a) for e in batch] == [
        ("put", "a", "1", "a"), ("put", "a", "2", "a"), ("delete", "a", "1", "a")]
    assert store.count_at_log_position("b")[0] == 1
    assert set(store.log_positions()) == {"", "a", "b"}


def test_existence_and_raw_vectors(store, gallery_name):
    g = gallery_name
    store.put_many(g, [(1, vec(1), None), (2, vec(2), None)])
    assert store.exists_many(g, [2, 5, 1]) == [True, False, True]
    assert store.exists_many(g, []) == []
    codec, raw = store.get_raw_vectors(g, [1, 5, 2])
    assert codec.name == "float32" and codec.nbytes(8) == 32
    assert raw[0] == vec(1).astype("<f4").tobytes() and raw[1] is None and raw[2] == vec(2).astype("<f4").tobytes()
    assert store.get_raw_vectors(g, [])[1] == []


def test_a_gallery_holds_vectors_of_one_size(store, gallery_name):
    g = gallery_name
    with pytest.raises(ValueError, match="4 dimensions in a batch of 8"):
        store.put_many(g, [(1, vec(1), None), (2, vec(2, d=4), None)])
    assert store.count(g) == 0  # nothing of the batch written
    store.put(g, 1, vec(1))
    with pytest.raises(ValueError, match="holds vectors of 8 dimensions; these have 4"):
        store.put(g, 2, vec(2, d=4))
    assert store.count(g) == 1 and store.get_vector(g, 2) is None
    store.delete(g, 1)  # emptied, a gallery takes vectors of another size
    store.put(g, 3, vec(3, d=4))
    np.testing.assert_array_equal(store.get_vector(g, 3), vec(3, d=4))


def test_patch_metadata_changes_only_existing_images(store, gallery_name):
    g = gallery_name
    store.put(g, 1, vec(1), {"camera_id": "3", "person_id": "p1"})
    assert store.patch_metadata(g, 1, {"camera_id": "4", "person_id": None, "external_id": "e9"}) is True
    meta = store.get(g, 1).metadata
    assert meta["camera_id"] == "4" and meta["person_id"] is None and meta["external_id"] == "e9"
    assert store.patch_metadata(g, 2, {"camera_id": "4"}) is False
    assert store.get(g, 2) is None and store.count(g) == 1  # no record resurrected
    with pytest.raises(ValueError):
        store.patch_metadata(g, 1, {"dim": "3"})  # the store's own field
    with pytest.raises(ValueError):
        store.patch_metadata(g, 1, {"camera_id": ""})
    assert store.get(g, 1).metadata["camera_id"] == "4"


def test_gallery_fields_go_with_the_gallery(store, gallery_name):
    g = gallery_name
    store.create_gallery(g, retention_days=3)
    assert store.get_gallery_field(g, "calibration") is None
    store.set_gallery_field(g, "calibration", '{"threshold": 0.5}')
    assert store.get_gallery_field(g, "calibration") == '{"threshold": 0.5}'
    with pytest.raises(ValueError):
        store.set_gallery_field(g, "retention_days", "9")
    assert store.gallery_info(g)["retention_days"] == 3
    store.delete_gallery(g)
    assert store.get_gallery_field(g, "calibration") is None


def test_a_lease_is_held_by_one_token_until_it_expires(store):
    assert store.hold_lease("chore", "a", ttl_ms=300) is True
    assert store.hold_lease("chore", "a", ttl_ms=300) is True  # still ours
    assert store.hold_lease("chore", "b", ttl_ms=300) is False
    assert store.hold_lease("other-chore", "b", ttl_ms=300) is True
    time.sleep(0.4)
    assert store.hold_lease("chore", "b", ttl_ms=300) is True


def test_event_reader_waits_for_new_entries(store):
    reader = store.event_reader(block_ms=50)
    try:
        t0 = time.monotonic()
        assert reader.read({"": "0-0"}, count=10) == [] and time.monotonic() - t0 >= 0.04  # waited, then nothing
        store.put("a", 1, vec(1))
        store.delete("a", 1)
        events = reader.read({"": "0-0", "a": "0-0"}, count=10)
        assert sorted((e.stream, e.op, e.ref) for e in events) == [("", "create", ""), ("a", "delete", "1"),
                                                                   ("a", "put", "1")]
        ends = {e.stream: e.id for e in events}  # each log's last
        assert reader.read(ends, count=10) == []
        assert reader.info("a").last == ends["a"] and reader.info("").last == ends[""]
    finally:
        reader.close()


def test_a_commit_guarded_by_a_job_aborts_once_it_is_cancelled(store, gallery_name):
    g = gallery_name
    jobs = store.job_store()
    store.put(g, 1, vec(1), model="old:1")
    for job_id, status in (("a" * 32, "cancelled"), ("b" * 32, "running")):
        jobs.create(job_id, "activate", None, {})
        jobs.update(job_id, status=status)
        watch, running = jobs.watch_running(job_id)

        def still_running(pipe):
            if not running(pipe):
                raise RuntimeError("cancelled")

        store.clear_staged(g)
        store.stage_vectors(g, [1], np.stack([vec(11, d=4)]))
        if status == "cancelled":
            with pytest.raises(RuntimeError):
                store.commit_staged([g], "new:1", "copy-1", watch=watch, precondition=still_running)
            assert store.active_bundle() is None
        else:
            store.commit_staged([g], "new:1", "copy-1", watch=watch, precondition=still_running)
            assert store.active_bundle() == "copy-1"


def test_the_leftovers_of_a_gallery_delete_that_crashed_half_way_never_come_back(store):
    """A delete marks the gallery, unlists it (with its drop entry), then deletes its keys: two slots, so two
    steps. After a crash between them, neither a create nor an upload under the name brings the old images back."""
    for first in ("create", "upload"):
        g = f"half-{first}"
        store.put_many(g, [(1, vec(1), {"camera_id": "1"}), (2, vec(2), None)])
        store.r.hset(store.k_gallery(g), "deleting", "1")  # what delete_gallery does first ...
        store.r.srem(store.k_galleries(), g)  # ... then second; then it crashed
        assert not store.gallery_exists(g) and store.exists(g, 1)
        if first == "create":
            assert store.create_gallery(g) is True
        else:
            assert store.put_many(g, [(3, vec(3), None)]) == [False]
        assert store.gallery_exists(g) and not store.exists(g, 1) and not store.exists(g, 2)
        assert store.count(g) == (0 if first == "create" else 1)
        assert store.get_gallery_field(g, "deleting") is None


def test_a_write_of_another_models_vectors_is_refused_whole(store, gallery_name):
    g = gallery_name
    store.put_many(g, [(1, vec(1), None)], model="old:1")
    with pytest.raises(GalleryModelMismatch, match="holds vectors of model old:1; these are of model new:1") as e:
        store.put_many(g, [(2, vec(2), None), (3, vec(3), None)], model="new:1")
    assert (e.value.gallery, e.value.stored, e.value.writer) == (g, "old:1", "new:1")
    assert store.count(g) == 1 and store.gallery_models([g]) == {g: "old:1"}
    # the same model writes; a write that names no model (tools, migrations) is not checked
    assert store.put_many(g, [(2, vec(2), None)], model="old:1") == [False]
    assert store.put_many(g, [(3, vec(3), None)]) == [False] and store.count(g) == 3


def test_compaction_gives_back_the_pages_a_large_delete_left_half_empty(store, gallery_name):
    g, dim = gallery_name, 2048  # 8 KiB vectors: 31 to a page
    store.put_many(g, [(i, vec(i, dim), {"camera_id": str(i % 5)}) for i in range(1, 201)])
    assert store.r.hlen(store.k_page_used(g)) == 7  # 200 images in 7 pages
    gone = set(np.random.default_rng(0).choice(np.arange(1, 201), 120, replace=False).tolist())
    store.delete_many(g, sorted(gone))
    kept = [i for i in range(1, 201) if i not in gone]
    assert store.r.hlen(store.k_page_used(g)) == 7  # every page still holds an image

    done = store.compact_vectors(g, batch=7)
    assert (done.pages_before, done.pages_after) == (7, 3) and done.moved > 0  # ceil(80 / 31) pages
    assert not any(store.r.exists(k) for k in store.page_keys(g)[3:])
    for i, got in zip(kept, store.get_vectors(g, kept)):
        np.testing.assert_array_equal(got, vec(i, dim))
    assert [m.metadata["camera_id"] for m in store.get_many(g, kept)] == [str(i % 5) for i in kept]
    ids, _ = zip(*store.iter_vectors(g))
    assert sorted(np.concatenate(ids).tolist()) == kept
    assert store.compact_vectors(g).moved == 0  # nothing left to move
    # the next writes fill the kept pages' free slots, not the freed ones
    store.put_many(g, [(1000 + i, vec(1000 + i, dim), None) for i in range(13)])
    assert store.r.hlen(store.k_page_used(g)) == 3


def test_compaction_while_images_are_written_and_deleted_loses_nothing(store, gallery_name):
    g, dim = gallery_name, 2048
    store.put_many(g, [(i, vec(i, dim), None) for i in range(1, 301)])
    store.delete_many(g, list(range(1, 301, 2)))
    stop = threading.Event()

    def churn():
        n = 1000
        while not stop.is_set():
            store.put_many(g, [(n, vec(n, dim), None)])
            store.delete_many(g, [n - 1])
            n += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(3):
            store.compact_vectors(g, batch=5)
    finally:
        stop.set()
        t.join()
    ids = sorted(store.vector_ids(g))
    for i, got in zip(ids, store.get_vectors(g, ids)):
        np.testing.assert_array_equal(got, vec(i, dim))
    assert [i for i in ids if i < 1000] == list(range(2, 301, 2))
    used = {int(k): int(v) for k, v in store.r.hgetall(store.k_page_used(g)).items()}
    assert sum(used.values()) == len(ids)  # every page's count is its images


def test_reid_compact_store_compacts_and_says_what_it_did(store, redis_url, gallery_name, tmp_path, capsys):
    from scripts.cli import main as reid

    g, dim = gallery_name, 2048
    store.put_many(g, [(i, vec(i, dim), None) for i in range(1, 101)])
    store.delete_many(g, list(range(1, 101, 2)))
    args = ["compact-store", "--redis-url", redis_url, "--data-dir", str(tmp_path), "--gallery", g]
    assert reid(args) == 0
    moved = int(capsys.readouterr().out.split(": ")[1].split()[0])
    assert moved > 0 and store.r.hlen(store.k_page_used(g)) == 2  # 50 images: 2 pages of 31
    assert reid(args) == 0 and capsys.readouterr().out == f"{g}: 0 image(s) moved, vector pages 2 -> 2\n"
    np.testing.assert_array_equal(store.get_vector(g, 100), vec(100, dim))


def test_compaction_runs_where_enough_pages_would_be_freed(store, gallery_name):
    from service.store_maintenance import compact_where_worthwhile

    sparse, dense = gallery_name + "-sparse", gallery_name + "-dense"
    for g in (sparse, dense):
        store.put_many(g, [(i, vec(i, 2048), None) for i in range(1, 156)])  # 5 pages of 31
    store.delete_many(sparse, list(range(1, 156, 2)) + list(range(2, 156, 4)))  # 39 left: 2 pages would do
    store.delete_many(dense, list(range(1, 31)))  # 125 left: still 5 pages' worth
    assert (store.freeable_pages(sparse), store.freeable_pages(dense)) == (3, 0)
    assert sparse not in compact_where_worthwhile(store, min_pages=4)  # (the Redis may hold other tests' galleries)
    done = compact_where_worthwhile(store, min_pages=3)
    assert sparse in done and dense not in done and (done[sparse].pages_before, done[sparse].pages_after) == (5, 2)
    assert store.freeable_pages(sparse) == 0 and compact_where_worthwhile(store, min_pages=0) == {}
