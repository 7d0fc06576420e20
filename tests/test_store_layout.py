"""Key layout 4 (Redis Cluster hash tags, a change log per gallery, a record per image, vectors in pages) and the
migrations of stores of layouts 1 (through layout 2) and 3.

``tests/fixtures/store-layout1`` is a real store written by the version of layout 1 (commit fb59d83, its own
``RedisStore``): ``appendonly.aof`` (the commands its redis-server logged, rewritten without an RDB preamble so any
Redis version replays it) and the blob folder it kept bytes in. Gallery ``cam-a``: 3 images with bytes on disk,
metadata, retention 30 days and a refine-auto field; ``cam-b``: float16 vectors, 2 images with bytes inside Redis and
one without; a finished job; ``default`` as the active bundle; a retention lease; 6 change-log entries.

``tests/fixtures/store-layout3`` likewise, by the version of layout 3 (commit 6853e30): the layout-1 store migrated by
it, then written to by it: ``cam-b`` got a fourth image; ``cam-c`` (float16, bytes on disk) 12 images, one of them
deleted and one's person_id patched.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import redis

from index.redis_server import EmbeddedRedis
from index.store import LAYOUT, RedisStore, image_id
from index.image_record import pack_entry, record_metadata, unpack_entry
from index.store_layout import LayoutMigration, _fold_batch, _fold_v3_batch, _rename_layout1, _v2_image, _v2_vectors, \
    _v3_entries, layout_of, migrate_layout

FIXTURE = Path(__file__).parent / "fixtures" / "store-layout1"
FIXTURE3 = Path(__file__).parent / "fixtures" / "store-layout3"
JOB = "0" * 31 + "1"


def aof_commands(path: Path) -> list[list[bytes]]:
    """The commands of an append-only file in RESP (arrays of bulk strings)."""
    data, pos, out = path.read_bytes(), 0, []

    def line() -> bytes:
        nonlocal pos
        end = data.index(b"\r\n", pos)
        got, pos = data[pos:end], end + 2
        return got

    while pos < len(data):
        header = line()
        assert header.startswith(b"*"), header
        args = []
        for _ in range(int(header[1:])):
            n = int(line()[1:])
            args.append(data[pos:pos + n])
            pos += n + 2
        out.append(args)
    return out


def replayed(tmp_path, fixture: Path):
    """A redis-server holding a fixture's store, and its blob folder."""
    with EmbeddedRedis(tmp_path / "redis") as srv:
        r = redis.Redis.from_url(srv.url)
        for cmd in aof_commands(fixture / "appendonly.aof"):
            r.execute_command(*cmd)
        blob_dir = tmp_path / "blobs"
        shutil.copytree(fixture / "blobs", blob_dir)
        yield srv.url, blob_dir


@pytest.fixture
def old_store(tmp_path):
    yield from replayed(tmp_path, FIXTURE)


@pytest.fixture
def layout3_store(tmp_path):
    yield from replayed(tmp_path, FIXTURE3)


def test_a_store_of_layout_1_is_migrated_and_reads_as_before(old_store):
    url, blob_dir = old_store
    store = RedisStore(url, blob_dir=blob_dir)
    assert layout_of(store.r) == "1" and store.list_galleries() == []  # this code reads layout 4 only

    done = migrate_layout(store)
    assert done.galleries == ["cam-a", "cam-b"] and done.events_dropped == 6
    assert done.entries_folded == 6 and done.vectors_dropped == 0
    assert layout_of(store.r) == LAYOUT and migrate_layout(store) is None  # once
    leftovers = [k.decode() for k in store.r.scan_iter("reid:*") if b"{" not in k]
    assert leftovers == []  # every key renamed into the new layout (or dropped: the old log, the lease)

    assert store.list_galleries() == ["cam-a", "cam-b"] and store.counts() == {"cam-a": 3, "cam-b": 3}
    assert store.gallery_info("cam-a")["retention_days"] == 30 and store.galleries_with_retention() == {"cam-a": 30}
    assert store.get_gallery_field("cam-a", "refine_auto") == '{"mode": "none"}'
    assert store.vector_dtype("cam-a") == "float32" and store.vector_dtype("cam-b") == "float16"
    assert store.active_bundle() == "default"
    job = store.job_store().get(JOB)
    assert job["status"] == "succeeded" and job["gallery"] == "cam-a"

    for g, on_disk in (("cam-a", 3), ("cam-b", 0)):
        ids = sorted(store.vector_ids(g))
        kept = store.get_image_bytes(g, ids)
        with_bytes = [(i, b) for i, b in zip(ids, kept) if b is not None]
        assert all(image_id(g, b) == i for i, b in with_bytes)  # the bytes are the images' own
        assert store.r.hlen(store.k_blobs(g)) == on_disk and len(with_bytes) == (3 if g == "cam-a" else 2)
        for i in ids:
            assert store.get(g, i).metadata["model"] == "m:1" and store.get_vector(g, i).shape == (8,)
    assert store.get("cam-b", 12345).metadata["camera_id"] == "1"
    assert {store.get("cam-a", i).metadata["person_id"] for i in store.vector_ids("cam-a")} == {"p0", "p1", "p2"}
    for sha in store.referenced_blobs("cam-a"):  # content-addressed blobs, where the store looks for them
        assert hashlib.sha256(store._blobs("cam-a").get(sha)).hexdigest() == sha

    # and it is a working store of layout 4: writes go to the gallery's own log
    store.put_many("cam-b", [(7, np.ones(8, np.float32), {"camera_id": "3"})])
    assert store.count_at_log_position("cam-b")[0] == 4
    assert [e.ref for b in store.read_events("cam-b", "0-0", store.log_positions(["cam-b"])["cam-b"]) for e in b] == [
        "7"]
    assert store.delete_gallery("cam-a") and store.list_galleries() == ["cam-b"]
    assert not [p for p in blob_dir.joinpath("cam-a").rglob("*") if p.is_file()]  # its blobs went with it


def test_a_migration_interrupted_half_way_finishes_when_run_again(old_store):
    url, blob_dir = old_store
    store = RedisStore(url, blob_dir=blob_dir)
    # as if a migration crashed after cam-a's vectors and one record: renamed, the rest still of layout 1
    old_ids = [int(f) for f, _ in store.r.hscan_iter("reid:gallery:cam-a:vectors")]
    store.r.rename(f"reid:gallery:cam-a:image:{old_ids[0]}", _v2_image("cam-a", old_ids[0]))
    store.r.rename("reid:gallery:cam-a:vectors", _v2_vectors("cam-a"))
    assert layout_of(store.r) == "1"
    done = migrate_layout(store)
    assert done.galleries == ["cam-a", "cam-b"]
    assert store.counts() == {"cam-a": 3, "cam-b": 3} and all(store.exists("cam-a", i) for i in old_ids)
    assert [k for k in store.r.scan_iter("reid:*") if b"{" not in k] == []


def test_a_fold_of_layout_2_interrupted_half_way_finishes_when_run_again(old_store):
    url, blob_dir = old_store
    store = RedisStore(url, blob_dir=blob_dir)
    # as if a migration crashed in layout 2 to 4: cam-a's first image folded, the rest still records and vectors
    _rename_layout1(store, LayoutMigration())
    store.r.set(store.k_layout(), "2")
    ids = sorted(int(f) for f, _ in store.r.hscan_iter(_v2_vectors("cam-a")))
    before = {i: store.r.hgetall(_v2_image("cam-a", i)) for i in ids}
    _fold_batch(store, "cam-a", ids[:1], LayoutMigration())
    assert store.count("cam-a") == 1 and store.r.hlen(_v2_vectors("cam-a")) == 2
    done = migrate_layout(store)
    assert done.entries_folded == 5 and layout_of(store.r) == LAYOUT
    assert store.counts() == {"cam-a": 3, "cam-b": 3} and not store.r.exists(_v2_vectors("cam-a"))
    assert not [k for k in store.r.scan_iter("reid:gallery:*:image:*")]
    for i in ids:  # what each record said, now read from its layout-4 record
        meta = store.get("cam-a", i).metadata
        assert meta["person_id"] == before[i][b"person_id"].decode()
        assert meta["created_at"] == before[i][b"created_at"].decode()


def test_an_empty_store_is_marked_with_the_current_layout(tmp_path):
    with EmbeddedRedis(tmp_path / "r") as srv:
        store = RedisStore(srv.url)
        assert layout_of(store.r) is None
        assert migrate_layout(store) is None and layout_of(store.r) == LAYOUT


def test_every_key_of_a_gallery_shares_its_hash_slot_and_global_keys_share_one(tmp_path):
    from redis.crc import key_slot

    g, store = "cam-7", RedisStore
    gallery_keys = [store.k_gallery(g), store.k_records(g), store.k_images(g), store.k_blobs(g),
                    store.k_blob_mark(g, "ab" * 32), store.k_blob_removals(g), store.k_staged(g),
                    store.k_gallery_events(g), store.k_page(g, 0), store.k_page(g, 12), store.k_free_slots(g),
                    store.k_page_used(g)]
    assert {key_slot(k.encode()) for k in gallery_keys} == {key_slot(g.encode())}
    from index.job_store import JobStore
    global_keys = [store.k_galleries(), store.k_events(), store.k_layout(), store.k_blob_store(),
                   store.k_active_bundle(), store.k_lease("retention"), JobStore.k_job(JOB), JobStore.k_lock("adapt"),
                   JobStore.K_ACTIVE, JobStore.K_CREATED]
    assert {key_slot(k.encode()) for k in global_keys} == {key_slot(b"global")}


def test_reid_migrate_store_migrates_and_says_what_it_did(old_store, capsys, tmp_path):
    from scripts.cli import main as reid

    url, blob_dir = old_store
    args = ["migrate-store", "--redis-url", url, "--blob-dir", str(blob_dir), "--data-dir", str(tmp_path / "data")]
    assert reid(args) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"key layout {LAYOUT}: {{") and '"entries_folded": 6' in said
    assert reid(args) == 0 and capsys.readouterr().out.startswith(f"key layout {LAYOUT}: already")
    assert RedisStore(url).counts() == {"cam-a": 3, "cam-b": 3}


def layout3_images(r: redis.Redis, g: str) -> dict[int, tuple[dict, bytes]]:
    """What a layout-3 gallery holds: id -> (metadata, vector bytes), read from its entries."""
    out = {}
    for field, entry in r.hscan_iter(_v3_entries(g)):
        record, vector = unpack_entry(entry)
        out[int(field)] = (record_metadata(b"\0" * 4 + record), vector)
    return out


def test_a_store_of_layout_3_is_migrated_to_records_and_pages_and_reads_as_before(layout3_store):
    url, blob_dir = layout3_store
    store = RedisStore(url, blob_dir=blob_dir)
    assert layout_of(store.r) == "3"
    before = {g: layout3_images(store.r, g) for g in ("cam-a", "cam-b", "cam-c")}
    logs = {g: store.r.xrange(store.k_gallery_events(g)) for g in before}
    assert {g: len(v) for g, v in before.items()} == {"cam-a": 3, "cam-b": 4, "cam-c": 11}

    done = migrate_layout(store)
    assert done.entries_folded == 18 and done.vectors_dropped == 0 and done.keys_renamed == 0
    assert layout_of(store.r) == LAYOUT and migrate_layout(store) is None
    assert not list(store.r.scan_iter("reid:gallery:*:entries"))
    assert store.counts() == {"cam-a": 3, "cam-b": 4, "cam-c": 11}
    for g, images in before.items():
        codec = store.vector_codec(g)
        assert codec.name == ("float32" if g == "cam-a" else "float16")
        ids = sorted(images)
        stored = store.get_raw_vectors(g, ids)[1]
        assert stored == [images[i][1] for i in ids]  # every vector's bytes, exactly
        for i, got in zip(ids, store.get_many(g, ids)):
            created, meta = images[i][0]
            assert {k: got.metadata[k] for k in meta} == meta
        assert store.r.xrange(store.k_gallery_events(g)) == logs[g]  # replicas keep their indexes
        # all of a gallery's vectors in one page (8 dimensions: 4,032 of them fit its first 4 KiB step)
        assert store.page_keys(g) == [store.k_page(g, 0)]
        assert store.r.strlen(store.k_page(g, 0)) == (4096 - 64) // codec.nbytes(8) * codec.nbytes(8)
    ids, vecs = zip(*store.iter_vectors("cam-c"))
    assert sum(len(i) for i in ids) == 11
    assert {m.metadata["person_id"] for m in store.get_many("cam-c", before["cam-c"])} == {"p9", None}
    kept = store.get_image_bytes("cam-c", sorted(before["cam-c"]))
    assert all(image_id("cam-c", b) == i for i, b in zip(sorted(before["cam-c"]), kept))

    # a working store of layout 4: a write, a delete (its slot is taken again), a whole gallery's deletion
    victim = sorted(before["cam-c"])[0]
    assert store.delete("cam-c", victim)
    assert store.r.lrange(store.k_free_slots("cam-c"), 0, -1) != []
    store.put_many("cam-c", [(7, np.ones(8, np.float32), {"camera_id": "3"})])
    assert store.r.llen(store.k_free_slots("cam-c")) == 0 and store.count("cam-c") == 11
    np.testing.assert_array_equal(store.get_vector("cam-c", 7), np.ones(8, np.float32))
    assert store.delete_gallery("cam-c") and not list(store.r.scan_iter("reid:gallery:{cam-c}*"))


def test_a_fold_of_layout_3_interrupted_half_way_finishes_when_run_again(layout3_store):
    url, blob_dir = layout3_store
    store = RedisStore(url, blob_dir=blob_dir)
    before = layout3_images(store.r, "cam-c")
    ids = sorted(before)
    _fold_v3_batch(store, "cam-c", ids[:4], LayoutMigration())  # as if it crashed after one batch
    assert store.count("cam-c") == 4 and store.r.hlen(_v3_entries("cam-c")) == 7
    done = migrate_layout(store)
    assert done.entries_folded == 3 + 4 + 7 and layout_of(store.r) == LAYOUT
    assert store.count("cam-c") == 11 and store.get_raw_vectors("cam-c", ids)[1] == [before[i][1] for i in ids]
    assert store.r.hget(store.k_gallery("cam-c"), "next_slot") == b"11"  # each image one slot, none twice


def test_leftovers_of_a_delete_that_crashed_under_layout_3_go_when_the_gallery_is_made_again(layout3_store):
    url, blob_dir = layout3_store
    store = RedisStore(url, blob_dir=blob_dir)
    # cam-a's delete crashed under layout 3 after unlisting it: its settings marked, its entries left
    store.r.hset(store.k_gallery("cam-a"), "deleting", "1")
    store.r.srem(store.k_galleries(), "cam-a")
    migrate_layout(store)
    assert store.r.exists(_v3_entries("cam-a")) and store.list_galleries() == ["cam-b", "cam-c"]
    assert store.create_gallery("cam-a") and store.count("cam-a") == 0
    assert not store.r.exists(_v3_entries("cam-a"))


def test_a_vector_of_another_size_than_its_gallery_is_left_in_the_old_hash(layout3_store):
    """Layout 3 let a gallery hold vectors of two sizes (the odd ones were never searchable); layout 4 holds one size
    per gallery, so the migration leaves an odd one where it was, says so, and loses nothing else."""
    url, blob_dir = layout3_store
    store = RedisStore(url, blob_dir=blob_dir)
    # the odd one comes first in its gallery's hash: the size is still the one most of its images have
    entries = store.r.hgetall(_v3_entries("cam-b"))
    record, vector = unpack_entry(entries[b"99"])
    store.r.delete(_v3_entries("cam-b"))
    store.r.hset(_v3_entries("cam-b"), "99", pack_entry(0, {"camera_id": "2"}, vector + vector))
    store.r.hset(_v3_entries("cam-b"), mapping={k: v for k, v in entries.items() if k != b"99"})
    assert store.r.hkeys(_v3_entries("cam-b"))[0] == b"99"
    done = migrate_layout(store)
    assert done.vectors_left == 1 and done.entries_folded == 17 and store.count("cam-b") == 3
    assert store.r.hkeys(_v3_entries("cam-b")) == [b"99"] and store.get("cam-b", 99) is None
    assert store.delete_gallery("cam-b") and not store.r.exists(_v3_entries("cam-b"))
