"""The store's key layout: which one a Redis holds, and the migrations from layouts 1 and 2 to layout 3.

Layout 1 (before Redis Cluster): ``reid:galleries``, ``reid:gallery:<g>[:part]``, one change log ``reid:events``,
``reid:active_bundle``, ``reid:blob_store``, ``reid:<name>:lock``, ``reid:job:<id>``, ``reid:jobs:*``; a gallery's
vectors in a hash ``…:vectors`` and each image's record in a hash of its own, ``…:image:<id>``.
Layout 2: the same names with a Redis Cluster hash tag, ``{g}`` for a gallery's keys and ``{global}`` for the rest,
a change log per gallery, and ``reid:{global}:layout`` = "2".
Layout 3 (:mod:`index.store`): as layout 2, but an image's record and vector are one value of the gallery's hash
``…:entries`` (:mod:`index.image_record`), and the model that embedded a gallery is in its settings.

:func:`migrate_layout` takes a store of layout 1 to 2, then 2 to 3:

* 1 to 2 renames every key to its layout-2 name, one RENAME each (atomic; a key renamed already is skipped), so it
  is safe to run again after a crash and by two processes at once. It runs on one Redis server only: a store of
  layout 1 was never a cluster's. The old change log is dropped rather than split: its entries name positions that
  no replica can hold in layout 2, so every replica rebuilds its indexes from the stored vectors once.
* 2 to 3 folds each gallery's records into entries, a batch of images per transaction (entries written, the
  vectors' fields and records deleted), on one server or a cluster (a gallery is one slot). An image already
  folded is skipped, so this too is safe to run again and twice at once. Ids, vectors and the change logs stay as
  they were: replicas keep their indexes and snapshots.

Replicas of the previous version must be stopped first: they would go on writing keys of the old layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis

from .image_record import METADATA_FIELDS, ms_from_iso, pack_entry
from .job_store import JobStore
from .store import LAYOUT, RedisStore

__all__ = ["LayoutMigration", "layout_of", "migrate_layout"]

log = logging.getLogger("reid.index")

OLD = "reid:"
#: layout-1 global keys that carry state, and their layout-2 names
_GLOBAL_RENAMES = {
    OLD + "galleries": RedisStore.k_galleries(),
    OLD + "active_bundle": RedisStore.k_active_bundle(),
    OLD + "blob_store": RedisStore.k_blob_store(),
    OLD + "jobs:active": JobStore.K_ACTIVE,
    OLD + "jobs:created": JobStore.K_CREATED,
}
#: a gallery's layout-1 hashes (beside its settings "reid:gallery:<g>" and image records), by their suffix
_GALLERY_PARTS = ("vectors", "images", "blobs", "vectors:staged")


@dataclass
class LayoutMigration:
    """What :func:`migrate_layout` did."""

    galleries: list[str] = field(default_factory=list)
    keys_renamed: int = 0
    events_dropped: int = 0  #: entries of the layout-1 change log
    leases_dropped: int = 0  #: short-lived locks (their holders are gone with the old version)
    entries_folded: int = 0  #: images whose record and vector became one entry (2 to 3)
    vectors_dropped: int = 0  #: vectors without a record (none in a healthy store; nothing to serve them with)

    def as_dict(self) -> dict:
        return {"galleries": self.galleries, "keys_renamed": self.keys_renamed,
                "events_dropped": self.events_dropped, "leases_dropped": self.leases_dropped,
                "entries_folded": self.entries_folded, "vectors_dropped": self.vectors_dropped}


def _v2_vectors(g: str) -> str:
    """Layout 2's hash of a gallery's vectors."""
    return RedisStore.k_gallery(g) + ":vectors"


def _v2_image(g: str, id_: int) -> str:
    """Layout 2's record of one image."""
    return f"{RedisStore.k_gallery(g)}:image:{int(id_)}"


def layout_of(r: redis.Redis) -> str | None:
    """The recorded layout, "1" (keys of layout 1 and no layout record), or None (an empty store: any layout)."""
    recorded = r.get(RedisStore.k_layout())
    if recorded is not None:
        return recorded.decode()
    if any(r.exists(k) for k in (OLD + "galleries", OLD + "events", OLD + "active_bundle")):
        return "1"
    return None


def _rename(r: redis.Redis, old: str, new: str) -> int:
    """RENAME unless ``old`` is gone (renamed already, by us before a crash or by another process now)."""
    try:
        r.rename(old, new)
        return 1
    except redis.ResponseError as e:
        if "no such key" in str(e).lower():
            return 0
        raise


def migrate_layout(store: RedisStore) -> LayoutMigration | None:
    """Bring a store of layout 1 or 2 to layout 3 (None: nothing to do). Record the layout on an empty store too, so
    a process of a previous version is refused instead of mixing layouts (it would see no galleries)."""
    r = store.r
    layout = layout_of(r)
    if layout == LAYOUT:
        return None
    if layout is None:
        r.set(RedisStore.k_layout(), LAYOUT, nx=True)
        return None
    if layout not in ("1", "2"):
        raise RuntimeError(f"the store has key layout {layout}, which this version does not know (it reads "
                           f"{LAYOUT}): run the version that wrote it")
    done = LayoutMigration()
    if layout == "1":
        _rename_layout1(store, done)
        r.set(RedisStore.k_layout(), "2")
    for g in store.list_galleries():
        _fold_gallery(store, g, done)
        if g not in done.galleries:
            done.galleries.append(g)
    r.set(RedisStore.k_layout(), LAYOUT)
    log.warning("store migrated from key layout %s to %s: %d galleries, %d keys renamed, %d images folded into "
                "entries, %d change-log entries dropped%s", layout, LAYOUT, len(done.galleries), done.keys_renamed,
                done.entries_folded, done.events_dropped,
                " (every replica rebuilds its indexes from Redis once)" if layout == "1" else "")
    return done


def _rename_layout1(store: RedisStore, done: LayoutMigration) -> None:
    r = store.r
    if store.cluster:
        raise RuntimeError("a store of layout 1 cannot be on Redis Cluster; migrate it on one server first")
    galleries = sorted(m.decode() for m in r.smembers(OLD + "galleries"))
    for g in galleries:
        old = f"{OLD}gallery:{g}"
        # the image ids, from the vectors hash under whichever name it has (a crash may have renamed it already)
        vectors = old + ":vectors" if r.exists(old + ":vectors") else _v2_vectors(g)
        for field_, _ in r.hscan_iter(vectors, count=1000):
            id_ = int(field_)
            done.keys_renamed += _rename(r, f"{old}:image:{id_}", _v2_image(g, id_))
        for part in _GALLERY_PARTS:
            done.keys_renamed += _rename(r, f"{old}:{part}", f"{store.k_gallery(g)}:{part}")
        done.keys_renamed += _rename(r, old, store.k_gallery(g))
        done.galleries.append(g)
    for key in r.scan_iter(match=OLD + "job:*", count=1000):
        key = key.decode()
        done.keys_renamed += _rename(r, key, JobStore.k_job(key.removeprefix(OLD + "job:")))
    for key in r.scan_iter(match=OLD + "jobs:lock:*", count=1000):
        key = key.decode()
        done.keys_renamed += _rename(r, key, JobStore.k_lock(key.removeprefix(OLD + "jobs:lock:")))
    for old, new in _GLOBAL_RENAMES.items():  # the listing last: a crash before it leaves layout 1 recognisable
        done.keys_renamed += _rename(r, old, new)
    done.events_dropped = int(r.xlen(OLD + "events")) if r.exists(OLD + "events") else 0
    r.delete(OLD + "events")
    for key in r.scan_iter(match=OLD + "*:lock", count=1000):
        done.leases_dropped += int(r.delete(key))


def _fold_gallery(store: RedisStore, g: str, done: LayoutMigration, batch: int = 500) -> None:
    """Layout 2 to 3 for one gallery: each image's record and vector become one entry."""
    r = store.r
    ids: list[int] = []
    for field_, _ in r.hscan_iter(_v2_vectors(g), count=batch):
        ids.append(int(field_))
        if len(ids) >= batch:
            _fold_batch(store, g, ids, done)
            ids = []
    if ids:
        _fold_batch(store, g, ids, done)


def _fold_batch(store: RedisStore, g: str, ids: list[int], done: LayoutMigration) -> None:
    r = store.r
    read = r.pipeline(transaction=False)
    read.hmget(_v2_vectors(g), [str(i) for i in ids])
    for i in ids:
        read.hgetall(_v2_image(g, i))
    vectors, *records = read.execute()
    entries: dict[str, bytes] = {}
    model = None
    for id_, vector, record in zip(ids, vectors, records):
        if vector is None:  # folded meanwhile by another process
            continue
        if not record:
            done.vectors_dropped += 1
            continue
        rec = {k.decode(): v.decode() for k, v in record.items()}
        model = rec.get("model") or model
        meta = {f: rec.get(f) for f in METADATA_FIELDS}
        entries[str(id_)] = pack_entry(ms_from_iso(rec["created_at"]) if rec.get("created_at") else 0, meta, vector)
    pipe = r.pipeline(transaction=True)  # one gallery: one slot
    if entries:
        for id_, entry in entries.items():
            pipe.hsetnx(store.k_entries(g), id_, entry)  # an entry written since (a new upload) stays
        done.entries_folded += len(entries)
    if model is not None:
        pipe.hset(store.k_gallery(g), "model", model)
    pipe.hdel(_v2_vectors(g), *(str(i) for i in ids))
    pipe.delete(*(_v2_image(g, i) for i in ids))
    pipe.execute()
