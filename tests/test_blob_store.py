"""Kept image bytes out of Redis: the content-addressed blob store, the store's rules for writing, sharing and
removing blobs, the orphan sweep, the legacy in-Redis layout and its migration, and float16 stored vectors.

Real files in tmp folders and a real redis-server (``redis_url``); faults are injected by failing a step of the
real code (a transaction that raises before EXEC, a write that fails half-way), never by replacing it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

import msgpack
import numpy as np
import pytest

from index.blob_gc import sweep_orphan_blobs
from index.blob_store import BlobCorrupt, BlobMissing, BlobStore, blob_key
from index import store as store_module
from index.image_record import METADATA_FIELDS, id_field, pack_record, record_metadata
from index.store import RedisStore, image_id
from tests.store_writes import slotted, write_image_unlogged


def vec(seed: int, d: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=d).astype(np.float32)
    return v / np.linalg.norm(v)


def photo(n: int) -> bytes:
    return f"image-bytes-{n}".encode() * 50


@pytest.fixture
def blob_dir(tmp_path):
    return tmp_path / "blobs"


@pytest.fixture
def store(redis_url, blob_dir):
    s = RedisStore(redis_url, blob_dir=blob_dir)
    yield s
    s.close()


def put_images(store: RedisStore, gallery: str, seeds, camera: str | None = None) -> list[int]:
    ids = [image_id(gallery, photo(n)) for n in seeds]
    store.put_many(gallery, [(i, vec(n), {"camera_id": camera} if camera else None) for i, n in zip(ids, seeds)],
                   images=[photo(n) for n in seeds])
    return ids


def blob_path(blob_dir, gallery: str, data: bytes):
    return BlobStore(blob_dir / gallery).path(blob_key(data))


# ---------------------------------------------------------------------------- the blob store itself


def test_round_trip_fan_out_and_idempotent_put(tmp_path):
    blobs = BlobStore(tmp_path)
    data = b"\x89PNG" + os.urandom(3000)
    key = blobs.put(data)
    assert key == hashlib.sha256(data).hexdigest()
    assert blobs.path(key) == tmp_path / key[:2] / key[2:4] / key and blobs.path(key).read_bytes() == data
    assert blobs.get(key) == data and list(blobs.keys()) == [key]
    inode = blobs.path(key).stat().st_ino
    assert blobs.put(data) == key and blobs.path(key).stat().st_ino == inode  # already there: nothing written
    assert not list(blobs.leftovers())


def test_missing_and_damaged_blobs_raise_clear_errors_and_put_repairs(tmp_path):
    blobs = BlobStore(tmp_path)
    data = b"some image"
    key = blobs.put(data)
    blobs.path(key).write_bytes(b"some imagf")  # same size, other bytes: bit rot
    with pytest.raises(BlobCorrupt, match=f"blob {key} .* damaged"):
        blobs.get(key)
    assert blobs.put(data) == key and blobs.get(key) == data  # a put over a damaged blob rewrites it
    assert blobs.delete(key) and not blobs.delete(key)
    with pytest.raises(BlobMissing, match=f"blob {key} is missing"):
        blobs.get(key)
    with pytest.raises(ValueError, match="invalid blob key"):
        blobs.get("../../etc/passwd")


def test_put_writes_a_temp_file_in_place_then_renames_it(tmp_path, monkeypatch):
    """Atomic: the blob's name appears only by a rename of a complete, fsynced file from the same folder; a write
    that fails half-way leaves neither the blob nor its temp file."""
    blobs = BlobStore(tmp_path)
    data = os.urandom(10_000)
    real_write, real_replace, real_fsync = os.write, os.replace, os.fsync
    events = []

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    key = blobs.put(data)
    renames = [e for e in events if e[0] == "rename"]
    assert len(renames) == 1
    _, src, dst = renames[0]
    assert dst == str(blobs.path(key)) and os.path.dirname(src) == os.path.dirname(dst)
    assert os.path.basename(src).startswith(".tmp-")
    # the file's bytes are fsynced before the rename, the folder (the rename itself) after it
    assert events.index(("fsync", src)) < events.index(renames[0])
    assert events[-1] == ("fsync", str(blobs.path(key).parent))

    def failing_write(fd, view):  # the disk fills up after the first chunk
        if len(view) < len(data):
            raise OSError(28, "No space left on device")
        return real_write(fd, view[:4096])

    monkeypatch.setattr(os, "write", failing_write)
    other = os.urandom(10_000)
    with pytest.raises(OSError, match="No space"):
        blobs.put(other)
    assert not blobs.path(blob_key(other)).exists() and not list(blobs.leftovers())


# ---------------------------------------------------------------------------- the store's rules


def test_kept_bytes_go_to_disk_not_redis_and_read_back(store, blob_dir, gallery_name):
    g = gallery_name
    ids = put_images(store, g, range(5), camera="c1")
    assert not store.r.exists(store.k_images(g))  # no image bytes in Redis RAM
    assert store.r.hlen(store.k_blobs(g)) == 5 and store.count_images(g) == 5
    for i, n in zip(ids, range(5)):
        assert blob_path(blob_dir, g, photo(n)).read_bytes() == photo(n)
        assert store.r.hget(store.k_blobs(g), str(i)) == hashlib.sha256(photo(n)).digest()
    assert store.get_image_bytes(g, [ids[1], 12345]) == [photo(1), None]
    got = {i: (data, cam) for batch in store.iter_images(g, batch=2) for i, data, cam in batch}
    assert got == {i: (photo(n), "c1") for i, n in zip(ids, range(5))}
    assert store.images_without_bytes() == {}
    # the record holds the vector's slot and the metadata, nothing else: no bytes, no id or gallery (the hash says both)
    created, meta = record_metadata(store.r.hget(store.k_records(g), id_field(ids[0])))
    assert meta == {f: ("c1" if f == "camera_id" else None) for f in METADATA_FIELDS}
    assert len(store.get_raw_vectors(g, ids[:1])[1][0]) == 4 * 8
    with pytest.raises(ValueError, match="content id"):  # a blob is one image's: its id must be the content id
        store.put_many(g, [(7, vec(7), None)], images=[photo(7)])


def test_same_bytes_in_two_galleries_are_two_blobs_and_deleting_one_keeps_the_other(store, blob_dir):
    (a,), (b,) = put_images(store, "gal-a", [1]), put_images(store, "gal-b", [1])
    pa, pb = blob_path(blob_dir, "gal-a", photo(1)), blob_path(blob_dir, "gal-b", photo(1))
    assert pa != pb and pa.is_file() and pb.is_file()
    assert store.delete("gal-a", a) is True
    assert not pa.exists() and store.get_image_bytes("gal-b", [b]) == [photo(1)]
    assert store.delete_gallery("gal-b")
    assert not pb.exists() and not (blob_dir / "gal-b").exists()  # the gallery's folder goes with it
    # no removal mark is left behind
    assert not list(store.r.scan_iter("reid:gallery:*:blob-removing:*"))


def test_delete_many_and_delete_gallery_remove_their_blobs(store, blob_dir, gallery_name):
    g = gallery_name
    ids = put_images(store, g, range(6))
    assert store.delete_many(g, ids[:3] + [999]) == 3
    assert [blob_path(blob_dir, g, photo(n)).exists() for n in range(6)] == [False] * 3 + [True] * 3
    assert store.count_images(g) == 3 and store.get_image_bytes(g, ids[:3]) == [None] * 3
    assert store.delete_gallery(g)
    assert not any(blob_path(blob_dir, g, photo(n)).exists() for n in range(6))
    assert not store.r.exists(store.k_blobs(g))


class _FailingStore(RedisStore):
    """A store whose next write fails after its blobs are written and before its script runs (as a crash or a
    lost connection there would)."""

    fail = True

    def _script(self, source, keys, args):
        if self.fail and source == store_module._PUT:
            raise ConnectionError("connection lost before the write")
        return super()._script(source, keys, args)


def test_a_failure_between_blob_write_and_redis_write_leaves_an_orphan_never_a_dangling_record(
        redis_url, blob_dir, gallery_name):
    g = gallery_name
    store = _FailingStore(redis_url, blob_dir=blob_dir)
    i = image_id(g, photo(1))
    with pytest.raises(ConnectionError):
        store.put_many(g, [(i, vec(1), None)], images=[photo(1)])
    orphan = blob_path(blob_dir, g, photo(1))
    assert orphan.is_file()  # written (and fsynced) first ...
    assert not store.exists(g, i) and store.get_vector(g, i) is None and not store.r.exists(store.k_blobs(g))
    assert store.get_image_bytes(g, [i]) == [None]  # ... but nothing points at it
    # the sweep removes it (once older than the grace)
    assert sweep_orphan_blobs(store, grace_s=3600).too_recent == 1 and orphan.is_file()
    report = sweep_orphan_blobs(store, grace_s=0)
    assert report.removed == 1 and not orphan.exists()
    # and the upload, retried, succeeds
    store.fail = False
    assert store.put_many(g, [(i, vec(1), None)], images=[photo(1)]) == [False]
    assert store.get_image_bytes(g, [i]) == [photo(1)]
    store.close()


def test_a_writer_waits_while_its_blob_is_being_removed_then_writes_it_again(store, blob_dir, gallery_name):
    """Delete and re-upload of the same image at the same moment: the writer must not reference the blob the
    remover is about to unlink. A removal in progress (its mark set, the file moved to the trash) holds the writer
    back; when it ends, the writer writes the blob again and references it."""
    g = gallery_name
    (i,) = put_images(store, g, [1])
    key = blob_key(photo(1))
    blobs = BlobStore(blob_dir / g)
    # a remover in the middle of its work: the record is deleted, the mark set, the file in its trash
    store.r.hdel(store.k_records(g), id_field(i))
    store.r.hdel(store.k_blobs(g), str(i))
    store.r.set(store.k_blob_mark(g, key), "remover", px=30_000)
    trash = blobs.move_to_trash(key, "remover")
    done = threading.Event()
    result = []
    writer = threading.Thread(target=lambda: (result.append(store.put_many(g, [(i, vec(1), None)],
                                                                            images=[photo(1)])), done.set()))
    writer.start()
    assert not done.wait(0.5)  # held back by the mark
    blobs.discard(trash)  # the remover finishes: unlinks its trash, releases its mark
    store.r.delete(store.k_blob_mark(g, key))
    assert done.wait(10)
    writer.join()
    assert result == [[False]] and store.get_image_bytes(g, [i]) == [photo(1)] and blobs.exists(key)


def test_a_remover_whose_mark_ran_out_puts_the_blob_back(store, blob_dir, gallery_name):
    """A remover slower than its mark's lifetime cannot know whether a writer referenced the blob meanwhile: it
    puts the blob back (an orphan at worst, for the sweep) rather than unlinking it."""
    g = gallery_name
    (i,) = put_images(store, g, [1])
    key = blob_key(photo(1))
    store._remove_blobs(g, [key], token="expired")  # its mark is not (any more) there
    assert BlobStore(blob_dir / g).get(key) == photo(1) and store.get_image_bytes(g, [i]) == [photo(1)]


def test_the_sweep_removes_only_old_unreferenced_blobs_and_leftovers(store, blob_dir, gallery_name):
    g = gallery_name
    (kept,) = put_images(store, g, [1])
    blobs = BlobStore(blob_dir / g)
    old, young, damaged = blobs.put(photo(2)), blobs.put(photo(3)), blobs.put(photo(4))
    blobs.path(damaged).write_bytes(b"x" * len(photo(4)))
    past = time.time() - 7200
    for key in (old, damaged):
        os.utime(blobs.path(key), (past, past))
    tmp = blobs.path(old).parent / ".tmp-deadbeef"
    tmp.write_bytes(b"half a put")
    os.utime(tmp, (past, past))
    # a remover that was slower than its mark and crashed after trashing a blob its image references again
    ref_key = blob_key(photo(1))
    trash = blobs.move_to_trash(ref_key, "crashed")
    os.utime(trash, (past, past))
    # a folder of a gallery that no longer exists in Redis
    gone = BlobStore(blob_dir / "deleted-gallery")
    gone_key = gone.put(photo(9))
    os.utime(gone.path(gone_key), (past, past))

    report = sweep_orphan_blobs(store, grace_s=3600)
    assert (report.removed, report.too_recent, report.corrupt, report.leftovers_removed, report.restored) == (
        2, 1, 1, 1, 1)
    assert not blobs.exists(old) and blobs.exists(young) and blobs.exists(damaged) and not tmp.exists()
    assert store.get_image_bytes(g, [kept]) == [photo(1)]  # put back from the trash
    assert not (blob_dir / "deleted-gallery").exists()


def test_the_sweep_never_removes_a_blob_that_a_record_references(store, blob_dir, gallery_name):
    """Even when its snapshot of the references is stale: the removal re-checks atomically."""
    g = gallery_name
    (i,) = put_images(store, g, [1])
    key = blob_key(photo(1))
    assert store.remove_unreferenced_blob(g, i, key) is False
    assert store.get_image_bytes(g, [i]) == [photo(1)]


# ---------------------------------------------------------------------------- the layout before the blob store


def write_previous_layout(store, gallery: str, seeds, dim: int = 8, odd_id: int | None = None) -> list[int]:
    """What the store wrote before the blob store (under today's key layout: the layout has its own migration,
    tests/test_store_layout.py): float32 vectors, bytes in ``…:images``, no vector_dtype record."""
    r, ids = store.r, []
    for n in seeds:
        i = image_id(gallery, photo(n))
        ids.append(i)
        write_image_unlogged(store, gallery, i, vec(n, dim).astype("<f4").tobytes(), {"camera_id": f"c{n}"})
        r.hset(store.k_images(gallery), str(i), photo(n))
        r.xadd(store.k_gallery_events(gallery), {"op": "put", "id": str(i)})
    if odd_id is not None:  # bytes kept under an id that is not their content id (a hand-made record)
        write_image_unlogged(store, gallery, odd_id, vec(99, dim).astype("<f4").tobytes())
        r.hset(store.k_images(gallery), str(odd_id), b"odd bytes")
    r.sadd(store.k_galleries(), gallery)
    r.hset(store.k_gallery(gallery), mapping={"name": gallery, "created_at": "2024-01-01T00:00:00.000Z"})
    return ids


def test_a_store_of_the_previous_layout_is_read_then_migrated(redis_url, blob_dir, gallery_name):
    g = gallery_name
    # this store stores float16 and keeps bytes on disk: neither may misread the old gallery
    store = RedisStore(redis_url, blob_dir=blob_dir, vector_dtype="float16")
    ids = write_previous_layout(store, g, range(4), odd_id=42)
    assert store.vector_dtype(g) == "float32"
    np.testing.assert_array_equal(store.get_vector(g, ids[1]), vec(1))
    assert store.get_image_bytes(g, ids[:2]) == [photo(0), photo(1)]
    assert store.count_images(g) == 5 and store.image_bytes_in_redis() == {g: 5}
    # a new image in the old gallery keeps its dtype: no mixed content
    (new,) = put_images(store, g, [7])
    assert store.vector_dtype(g) == "float32" and len(store.get_raw_vectors(g, [new])[1][0]) == 4 * 8
    np.testing.assert_array_equal(store.get_vector(g, new), vec(7))
    assert store.get_image_bytes(g, [new]) == [photo(7)] and blob_path(blob_dir, g, photo(7)).is_file()

    result = store.migrate_image_bytes(g, batch=2)
    assert (result.moved, result.dropped, result.skipped) == (4, 0, 1)
    assert store.r.hkeys(store.k_images(g)) == [b"42"]  # left in Redis, still served from there
    for i, n in zip(ids, range(4)):
        assert blob_path(blob_dir, g, photo(n)).read_bytes() == photo(n)
    assert store.get_image_bytes(g, ids + [42]) == [photo(n) for n in range(4)] + [b"odd bytes"]
    got = {i: data for batch in store.iter_images(g) for i, data, _ in batch}
    assert got == {**{i: photo(n) for i, n in zip(ids, range(4))}, new: photo(7), 42: b"odd bytes"}
    assert store.count_images(g) == 6 and store.images_without_bytes() == {}
    assert store.migrate_image_bytes(g).moved == 0  # again: nothing left to move
    # deletion after migration removes the blob
    store.delete(g, ids[0])
    assert not blob_path(blob_dir, g, photo(0)).exists()
    store.close()


def test_migration_drops_bytes_of_images_deleted_meanwhile(redis_url, blob_dir, gallery_name):
    g = gallery_name
    store = RedisStore(redis_url, blob_dir=blob_dir)
    ids = write_previous_layout(store, g, range(3))
    store.r.hdel(store.k_records(g), id_field(ids[0]))  # a record gone but its bytes left behind
    result = store.migrate_image_bytes(g)
    assert (result.moved, result.dropped) == (2, 1)
    assert not blob_path(blob_dir, g, photo(0)).exists() and not store.r.exists(store.k_images(g))
    store.close()


def test_image_storage_redis_keeps_the_previous_layout_and_reads_disk_too(redis_url, blob_dir, gallery_name):
    g = gallery_name
    disk = RedisStore(redis_url, blob_dir=blob_dir)
    (a,) = put_images(disk, g, [1])
    in_redis = RedisStore(redis_url, blob_dir=blob_dir, image_storage="redis")
    (b,) = put_images(in_redis, g, [2])
    assert in_redis.r.hget(in_redis.k_images(g), str(b)) == photo(2)
    assert in_redis.get_image_bytes(g, [a, b]) == [photo(1), photo(2)]
    assert in_redis.count_images(g) == 2
    with pytest.raises(ValueError, match="needs a blob_dir"):
        RedisStore(redis_url, image_storage="disk")
    disk.close(), in_redis.close()


# ---------------------------------------------------------------------------- float16 stored vectors


def test_float16_round_trip_and_the_per_gallery_dtype_record(redis_url, gallery_name):
    g16, g32 = gallery_name + "-16", gallery_name + "-32"
    s16 = RedisStore(redis_url, vector_dtype="float16")
    s32 = RedisStore(redis_url)  # the setting changed back (or another replica): float32
    v = np.stack([vec(n, 256) for n in range(5)])
    s16.put_many(g16, [(n + 1, v[n], None) for n in range(5)])
    assert s16.vector_dtype(g16) == "float16" and s16.r.hget(s16.k_gallery(g16), "vector_dtype") == b"float16"
    raw = s16.get_raw_vectors(g16, [1])[1][0]
    assert len(raw) == 2 * 256  # half the bytes
    expect = v.astype(np.float16).astype(np.float32)
    for store in (s16, s32):  # read correctly whatever the reader's own setting
        got = store.get_vector(g16, 1)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expect[0])
        assert np.max(np.abs(got - v[0])) < 5e-4
        ids, vecs = next(store.iter_vectors(g16))
        np.testing.assert_array_equal(vecs[np.argsort(ids)], expect)
        codec, raws = store.get_raw_vectors(g16, [2, 3])
        np.testing.assert_array_equal(codec.decode_many(raws, 256), expect[1:3])
    # the float32 store adds to the float16 gallery in float16; its own new gallery is float32
    s32.put_many(g16, [(9, vec(9, 256), None)])
    s32.put_many(g32, [(1, vec(1, 256), None)])
    assert len(s32.get_raw_vectors(g16, [9])[1][0]) == 512 and len(s32.get_raw_vectors(g32, [1])[1][0]) == 1024
    assert s16.vector_dtype(g32) == "float32"
    np.testing.assert_array_equal(s16.get_vector(g32, 1), vec(1, 256))
    # a model activation restages every gallery in the activating store's dtype and records it
    for g in (g16, g32):
        s32.clear_staged(g)
        ids = sorted(s32.vector_ids(g))
        s32.stage_vectors(g, ids, np.stack([vec(100 + i, 4) for i in ids]))
    s32.commit_staged([g16, g32], "new@1", "bundle-2")
    assert s16.vector_dtype(g16) == "float32"
    np.testing.assert_array_equal(s16.get_vector(g16, 9), vec(109, 4))
    s16.close(), s32.close()


def test_a_gallery_that_two_writers_with_different_dtypes_start_at_once_gets_one_dtype(redis_url, gallery_name):
    g = gallery_name
    stores = [RedisStore(redis_url, vector_dtype=d) for d in ("float16", "float32") * 4]
    barrier = threading.Barrier(len(stores))

    def write(n, store):
        barrier.wait()
        store.put_many(g, [(n + 1, vec(n, 16), None)])

    threads = [threading.Thread(target=write, args=(n, s)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dtype = stores[0].vector_dtype(g)
    sizes = {len(v) for v in stores[0].get_raw_vectors(g, range(1, len(stores) + 1))[1]}
    assert sizes == {16 * (2 if dtype == "float16" else 4)} and stores[0].count(g) == len(stores)
    for s in stores:
        s.close()


def test_float16_refuses_values_it_cannot_hold(redis_url, gallery_name):
    s16 = RedisStore(redis_url, vector_dtype="float16")
    with pytest.raises(ValueError, match="float16 range"):
        s16.put_many(gallery_name, [(1, np.full(4, 1e6, np.float32), None)])
    s16.close()


# ---------------------------------------------------------------------------- one blob directory for all replicas


def test_a_store_whose_blob_dir_is_not_the_shared_one_is_told(redis_url, tmp_path):
    in_redis = RedisStore(redis_url, blob_dir=tmp_path / "c", image_storage="redis")
    assert in_redis.check_blob_dir() is None and not in_redis.r.exists(in_redis.k_blob_store())  # no disk yet
    first = RedisStore(redis_url, blob_dir=tmp_path / "a")
    assert first.check_blob_dir() is None  # claims the store for its folder
    ident = first.r.get(first.k_blob_store()).decode()
    assert (tmp_path / "a" / ".reid-blob-store").read_text().strip() == ident
    assert RedisStore(redis_url, blob_dir=tmp_path / "a").check_blob_dir() is None  # a replica sharing it
    problem = RedisStore(redis_url, blob_dir=tmp_path / "b").check_blob_dir()  # a replica with its own folder
    assert problem and str(tmp_path / "b") in problem and ident in problem and "REID_BLOB_DIR" in problem
    assert in_redis.check_blob_dir() is not None  # bytes are on disk now: it must see the same folder
    # the sweep never runs on a folder that is not the store's (the CLI checks first); its identity file stays
    assert sweep_orphan_blobs(first, grace_s=0).galleries == 0 and (tmp_path / "a" / ".reid-blob-store").exists()


# ---------------------------------------------------------------------------- the sizing benchmark


def test_the_memory_benchmark_measures_what_the_layouts_cost(tmp_path):
    """``bench/store_memory.py`` (README, Sizing) at a small N, on a redis-server of its own (it turns the AOF off
    while it measures): float16 halves the vectors' share, and bytes on disk cost Redis a small reference instead
    of their size."""
    from bench.store_memory import IMAGE_BYTES, measure
    from index.redis_server import EmbeddedRedis

    with EmbeddedRedis(tmp_path / "redis") as srv:
        rows = {(dtype, storage): measure(srv.url, tmp_path / f"blobs-{dtype}-{storage}", 300, 64, dtype, storage,
                                          "realistic")
                for dtype in ("float32", "float16") for storage in ("none", "disk", "redis")}
    # a record: the slot, ~100 bytes of metadata, and the hash's bookkeeping; whatever the dtype
    for dtype in ("float32", "float16"):
        assert 100 <= rows[dtype, "none"]["parts"]["records"] < 250
    # the vectors, side by side in pages: a page grows in steps that double, so its last one is at most half empty
    v32, v16 = rows["float32", "none"]["parts"]["vectors"], rows["float16", "none"]["parts"]["vectors"]
    assert 4 * 64 <= v32 < 2 * 4 * 64 and 2 * 64 <= v16 < 2 * 2 * 64 and v32 - v16 > 100
    on_disk, in_redis = rows["float32", "disk"]["parts"]["kept_bytes_hash"], rows["float32", "redis"]["parts"][
        "kept_bytes_hash"]
    assert 32 <= on_disk < 200 and in_redis >= IMAGE_BYTES
    for row in rows.values():
        assert row["bytes_per_image"] > row["parts"]["records"] + row["parts"]["vectors"]


@pytest.mark.parametrize("captured", ["2024-05-01T12:34:56.789Z", "2024-05-01T12:34:56Z", "2024-05-01T12:34:56.789+00:00",
                                      "1969-12-31T23:59:59.999Z", "2024-05-01T12:34:56.7890Z", "9999-12-31T23:59:59.999Z"])
def test_captured_at_reads_back_as_written_and_the_services_own_form_packs_small(captured):
    record = pack_record(5, {"captured_at": captured})
    assert record_metadata(slotted(record))[1]["captured_at"] == captured
    as_text = len(msgpack.packb([5, "", "", "", captured, ""]))
    # the service's form (ms, Z) is kept as an integer: 9 bytes instead of 25 (where the float seconds of
    # datetime.fromtimestamp cannot give the same ms back, as at year 9999, the text is kept)
    assert (len(record) < as_text) == (captured == "2024-05-01T12:34:56.789Z")


def test_a_patch_keeps_a_compact_captured_at_and_can_replace_it(store, gallery_name):
    g = gallery_name
    store.put_many(g, [(1, vec(1), {"captured_at": "2024-05-01T12:34:56.789Z", "camera_id": "c1"})])
    assert store.patch_metadata(g, 1, {"person_id": "p7"})  # Lua unpacks and repacks the record
    assert store.get(g, 1).metadata["captured_at"] == "2024-05-01T12:34:56.789Z"
    assert store.patch_metadata(g, 1, {"captured_at": "2024-05-02T00:00:00+02:00"})
    meta = store.get(g, 1).metadata
    assert (meta["captured_at"], meta["person_id"], meta["camera_id"]) == ("2024-05-02T00:00:00+02:00", "p7", "c1")
