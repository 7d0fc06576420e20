"""The store's key layout: which one a Redis holds, and the migrations from layouts 1, 2 and 3 to layout 4.

Layout 1 (before Redis Cluster): ``reid:galleries``, ``reid:gallery:<g>[:part]``, one change log ``reid:events``,
``reid:active_bundle``, ``reid:blob_store``, ``reid:<name>:lock``, ``reid:job:<id>``, ``reid:jobs:*``; a gallery's
vectors in a hash ``…:vectors`` and each image's record in a hash of its own, ``…:image:<id>``.
Layout 2: the same names with a Redis Cluster hash tag, ``{g}`` for a gallery's keys and ``{global}`` for the rest,
a change log per gallery, and ``reid:{global}:layout`` = "2".
Layout 3: as layout 2, but an image's record and vector are one value of the gallery's hash ``…:entries``
(:mod:`index.image_record`), and the model that embedded a gallery is in its settings.
Layout 4 (:mod:`index.store`): the records in ``…:records`` (field: the id's 8 bytes; value: the vector's slot and
the record), the vectors side by side in pages (:mod:`index.vector_pages`).

:func:`migrate_layout` takes a store of layout 1 to 2, then 2 or 3 to 4:

* 1 to 2 renames every key to its layout-2 name, one RENAME each (atomic; a key renamed already is skipped), so it
  is safe to run again after a crash and by two processes at once. It runs on one Redis server only: a store of
  layout 1 was never a cluster's. The old change log is dropped rather than split: its entries name positions that
  no replica can hold in layout 2, so every replica rebuilds its indexes from the stored vectors once.
* 2 or 3 to 4 folds each gallery's images into records and pages, a batch of images per Lua script (each image's
  record written, its vector put in a slot, its old field deleted, in one atomic step), on one server or a cluster
  (a gallery is one slot). An image already folded is skipped, so this too is safe to run again and twice at once.
  Ids, vectors and the change logs stay as they were: replicas keep their indexes and snapshots. Staged vectors of
  an activation that was running are dropped (that activation must run again).

Replicas of the previous version must be stopped first: they would go on writing keys of the old layout.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import redis

from . import vector_pages
from .image_record import METADATA_FIELDS, id_field, ms_from_iso, pack_record, unpack_entry
from .job_store import JobStore
from .store import LAYOUT, LEGACY_DTYPE, RedisStore

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
    entries_folded: int = 0  #: images whose record and vector went to records and pages (2 or 3 to 4)
    vectors_dropped: int = 0  #: vectors without a record (none in a healthy store; nothing to serve them with)
    #: vectors of another size than the gallery's first (a gallery holds one size now): left in the old hash, which
    #: a delete of the gallery removes (none in a store written by one model)
    vectors_left: int = 0

    def as_dict(self) -> dict:
        return {"galleries": self.galleries, "keys_renamed": self.keys_renamed,
                "events_dropped": self.events_dropped, "leases_dropped": self.leases_dropped,
                "entries_folded": self.entries_folded, "vectors_dropped": self.vectors_dropped,
                "vectors_left": self.vectors_left}


# Fold a batch of one gallery's images of layout 2 or 3 into records and pages, each only if it has no record yet
# (written by a new version meanwhile, or by another migration), and drop its old field; a vector of another size
# than the gallery's stays where it is. The gallery's size is the one its first batch holds most of.
# KEYS: settings, records, the old hash (layout 2's vectors, layout 3's entries).   ARGV: the batch's commonest
# vector size, then per image: id field, id (decimal), record, vector ('' none: the field only goes).
# Returns {folded, left}
_FOLD = vector_pages.LUA + """
local s = KEYS[1]
local folded, left = 0, 0
for i = 2, #ARGV, 4 do
  local keep = false
  if #ARGV[i + 3] > 0 and redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then
    local vb = redis.call('HGET', s, 'vector_bytes')
    if not vb then
      vb = ARGV[1]
      redis.call('HSET', s, 'vector_bytes', vb, 'page_slots', page_slots(tonumber(vb)))
    end
    if tonumber(vb) == #ARGV[i + 3] then
      local slot = take_slot(s)
      put_vector(s, slot, ARGV[i + 3], tonumber(vb), tonumber(redis.call('HGET', s, 'page_slots')))
      redis.call('HSET', KEYS[2], ARGV[i], struct.pack('<I4', slot) .. ARGV[i + 2])
      folded = folded + 1
    else
      left = left + 1
      keep = true
    end
  end
  if not keep then redis.call('HDEL', KEYS[3], ARGV[i + 1]) end
end
return {folded, left}
"""


def _v2_vectors(g: str) -> str:
    """Layout 2's hash of a gallery's vectors."""
    return RedisStore.k_gallery(g) + ":vectors"


def _v2_image(g: str, id_: int) -> str:
    """Layout 2's record of one image."""
    return f"{RedisStore.k_gallery(g)}:image:{int(id_)}"


def _v3_entries(g: str) -> str:
    """Layout 3's hash of a gallery's entries (record and vector in one value)."""
    return RedisStore.k_gallery(g) + ":entries"


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
    """Bring a store of layout 1, 2 or 3 to layout 4 (None: nothing to do). Record the layout on an empty store too, so
    a process of a previous version is refused instead of mixing layouts (it would see no galleries)."""
    r = store.r
    layout = layout_of(r)
    if layout == LAYOUT:
        return None
    if layout is None:
        r.set(RedisStore.k_layout(), LAYOUT, nx=True)
        return None
    if layout not in ("1", "2", "3"):
        raise RuntimeError(f"the store has key layout {layout}, which this version does not know (it reads "
                           f"{LAYOUT}): run the version that wrote it")
    done = LayoutMigration()
    if layout == "1":
        _rename_layout1(store, done)
        r.set(RedisStore.k_layout(), "2")
    for g in store.list_galleries():
        r.hsetnx(store.k_gallery(g), "vector_dtype", LEGACY_DTYPE)
        r.delete(store.k_staged(g))  # of an activation that was running: its fields are of the old layout
        if layout == "3":
            _fold_gallery(store, g, done, _v3_entries(g), _fold_v3_batch)
        else:
            _fold_gallery(store, g, done, _v2_vectors(g), _fold_batch)
        if g not in done.galleries:
            done.galleries.append(g)
    r.set(RedisStore.k_layout(), LAYOUT)
    log.warning("store migrated from key layout %s to %s: %d galleries, %d keys renamed, %d images folded into "
                "records and vector pages, %d change-log entries dropped%s", layout, LAYOUT, len(done.galleries),
                done.keys_renamed, done.entries_folded, done.events_dropped,
                " (every replica rebuilds its indexes from Redis once)" if layout == "1" else "")
    if done.vectors_left:
        log.warning("%d vector(s) of another size than the rest of their gallery were left in the gallery's hash of "
                    "layout %s (…:entries or …:vectors): not searchable before either; re-ingest those images",
                    done.vectors_left, layout)
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


def _fold_gallery(store: RedisStore, g: str, done: LayoutMigration, old: str, fold_batch, batch: int = 500) -> None:
    """Layout 2 or 3 to 4 for one gallery: a batch of the image ids in its old hash ``old`` at a time."""
    ids: list[int] = []
    for field_, _ in store.r.hscan_iter(old, count=batch):
        ids.append(int(field_))
        if len(ids) >= batch:
            fold_batch(store, g, ids, done)
            ids = []
    if ids:
        fold_batch(store, g, ids, done)


def _fold_batch(store: RedisStore, g: str, ids: list[int], done: LayoutMigration) -> None:
    """Layout 2 to 4: each image's vector (a field of ``…:vectors``) and record (a hash of its own)."""
    r = store.r
    read = r.pipeline(transaction=False)
    read.hmget(_v2_vectors(g), [str(i) for i in ids])
    for i in ids:
        read.hgetall(_v2_image(g, i))
    vectors, *records = read.execute()
    args: list = []
    model = None
    for id_, vector, record in zip(ids, vectors, records):
        if vector is None:  # folded meanwhile by another process
            continue
        if not record:
            done.vectors_dropped += 1
            args += [id_field(id_), str(id_), b"", b""]  # nothing to serve it with: its vector field goes
            continue
        rec = {k.decode(): v.decode() for k, v in record.items()}
        model = rec.get("model") or model
        meta = {f: rec.get(f) for f in METADATA_FIELDS}
        args += [id_field(id_), str(id_), pack_record(ms_from_iso(rec["created_at"]) if rec.get("created_at") else 0,
                                                      meta), vector]
    pipe = r.pipeline(transaction=True)  # one gallery: one slot
    if args:
        pipe.execute_command("EVAL", _FOLD, 3, store.k_gallery(g), store.k_records(g), _v2_vectors(g),
                             _commonest_size(args), *args)
    if model is not None:
        pipe.hset(store.k_gallery(g), "model", model)
    pipe.delete(*(_v2_image(g, i) for i in ids))
    res = pipe.execute()
    if args:
        _count(done, res[0])


def _fold_v3_batch(store: RedisStore, g: str, ids: list[int], done: LayoutMigration) -> None:
    """Layout 3 to 4: each image's entry (record and vector in one value) split into a record and a slot."""
    args: list = []
    for id_, entry in zip(ids, store.r.hmget(_v3_entries(g), [str(i) for i in ids])):
        if entry is not None:  # else folded meanwhile by another process
            record, vector = unpack_entry(entry)
            args += [id_field(id_), str(id_), record, vector]
    if args:
        _count(done, store.r.eval(_FOLD, 3, store.k_gallery(g), store.k_records(g), _v3_entries(g),
                                  _commonest_size(args), *args))


def _commonest_size(args: list) -> int:
    """The vector size most of a batch's images have (``args`` as :data:`_FOLD` takes them)."""
    sizes = Counter(len(v) for v in args[3::4] if v)
    return sizes.most_common(1)[0][0] if sizes else 0


def _count(done: LayoutMigration, result) -> None:
    folded, left = (int(x) for x in result)
    done.entries_folded += folded
    done.vectors_left += left
