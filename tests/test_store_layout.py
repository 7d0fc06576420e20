"""Key layout 3 (Redis Cluster hash tags, a change log per gallery, one entry per image) and the migration of a store
of layout 1 (through layout 2).

``tests/fixtures/store-layout1`` is a real store written by the previous version (commit fb59d83, its own
``RedisStore``): ``appendonly.aof`` (the commands its redis-server logged, rewritten without an RDB preamble so any
Redis version replays it) and the blob folder it kept bytes in. Gallery ``cam-a``: 3 images with bytes on disk,
metadata, retention 30 days and a refine-auto field; ``cam-b``: float16 vectors, 2 images with bytes inside Redis and
one without; a finished job; ``default`` as the active bundle; a retention lease; 6 change-log entries.
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
from index.store_layout import LayoutMigration, _fold_batch, _rename_layout1, _v2_image, _v2_vectors, layout_of, \
    migrate_layout

FIXTURE = Path(__file__).parent / "fixtures" / "store-layout1"
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


@pytest.fixture
def old_store(tmp_path):
    """A redis-server holding the layout-1 store, and its blob folder."""
    with EmbeddedRedis(tmp_path / "redis") as srv:
        r = redis.Redis.from_url(srv.url)
        for cmd in aof_commands(FIXTURE / "appendonly.aof"):
            r.execute_command(*cmd)
        blob_dir = tmp_path / "blobs"
        shutil.copytree(FIXTURE / "blobs", blob_dir)
        yield srv.url, blob_dir


def test_a_store_of_layout_1_is_migrated_and_reads_as_before(old_store):
    url, blob_dir = old_store
    store = RedisStore(url, blob_dir=blob_dir)
    assert layout_of(store.r) == "1" and store.list_galleries() == []  # this code reads layout 3 only

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

    # and it is a working store of layout 3: writes go to the gallery's own log
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


def test_a_fold_into_entries_interrupted_half_way_finishes_when_run_again(old_store):
    url, blob_dir = old_store
    store = RedisStore(url, blob_dir=blob_dir)
    # as if a migration crashed in layout 2 to 3: cam-a's first image folded, the rest still records and vectors
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
    for i in ids:  # what each record said, now read from its entry
        meta = store.get("cam-a", i).metadata
        assert meta["person_id"] == before[i][b"person_id"].decode()
        assert meta["created_at"] == before[i][b"created_at"].decode()


def test_an_empty_store_is_marked_layout_3(tmp_path):
    with EmbeddedRedis(tmp_path / "r") as srv:
        store = RedisStore(srv.url)
        assert layout_of(store.r) is None
        assert migrate_layout(store) is None and layout_of(store.r) == LAYOUT


def test_every_key_of_a_gallery_shares_its_hash_slot_and_global_keys_share_one(tmp_path):
    from redis.crc import key_slot

    g, store = "cam-7", RedisStore
    gallery_keys = [store.k_gallery(g), store.k_entries(g), store.k_images(g), store.k_blobs(g),
                    store.k_blob_mark(g, "ab" * 32), store.k_blob_removals(g), store.k_staged(g),
                    store.k_gallery_events(g)]
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
