"""The store's key layout: which one a Redis holds, and the migration from layout 1 to layout 2.

Layout 1 (before Redis Cluster): ``reid:galleries``, ``reid:gallery:<g>[:part]``, one change log ``reid:events``,
``reid:active_bundle``, ``reid:blob_store``, ``reid:<name>:lock``, ``reid:job:<id>``, ``reid:jobs:*``.
Layout 2 (:mod:`index.store`): the same names with a Redis Cluster hash tag, ``{g}`` for a gallery's keys and
``{global}`` for the rest, a change log per gallery, and ``reid:{global}:layout`` = "2".

:func:`migrate_layout` renames every key of layout 1 to its layout-2 name, one RENAME each (atomic; a key renamed
already is skipped), so it is safe to run again after a crash and by two processes at once. It runs on one Redis
server only: a store of layout 1 was never a cluster's. The old change log is dropped rather than split: its
entries name positions that no replica can hold in layout 2, so every replica rebuilds its indexes from the
stored vectors once (their snapshots' positions are of the old log). Replicas of the previous version must be
stopped first: they would go on writing layout-1 keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis

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

    def as_dict(self) -> dict:
        return {"galleries": self.galleries, "keys_renamed": self.keys_renamed,
                "events_dropped": self.events_dropped, "leases_dropped": self.leases_dropped}


def layout_of(r: redis.Redis) -> str | None:
    """"2", "1" (keys of layout 1 and no layout record), or None (an empty store: any layout)."""
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
    """Bring a store of layout 1 to layout 2 (None: nothing to do). Record layout 2 on an empty store too, so a
    process of the previous version is refused instead of mixing layouts (it would see no galleries)."""
    r = store.r
    layout = layout_of(r)
    if layout == LAYOUT:
        return None
    if layout is None:
        r.set(RedisStore.k_layout(), LAYOUT, nx=True)
        return None
    if store.cluster:
        raise RuntimeError("a store of layout 1 cannot be on Redis Cluster; migrate it on one server first")
    done = LayoutMigration()
    galleries = sorted(m.decode() for m in r.smembers(OLD + "galleries"))
    for g in galleries:
        old = f"{OLD}gallery:{g}"
        # the image ids, from the vectors hash under whichever name it has (a crash may have renamed it already)
        vectors = old + ":vectors" if r.exists(old + ":vectors") else store.k_vectors(g)
        for field_, _ in r.hscan_iter(vectors, count=1000):
            id_ = int(field_)
            done.keys_renamed += _rename(r, f"{old}:image:{id_}", store.k_image(g, id_))
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
    r.set(RedisStore.k_layout(), LAYOUT)
    log.warning("store migrated from key layout 1 to 2: %d galleries, %d keys renamed, %d change-log entries "
                "dropped (every replica rebuilds its indexes from Redis once)", len(done.galleries),
                done.keys_renamed, done.events_dropped)
    return done
