"""Keep this process's FAISS indexes equal to the Redis store (the truth) across crashes, restarts and replicas.

The indexes themselves are in :class:`service.index_cache.IndexCache`; this class changes them.

* Start (:meth:`IndexSync.load`): each gallery's snapshot (``{data_dir}/index/<gallery>.faiss`` + manifest)
  is loaded when it was built for the active model and index settings and the change log ``reid:events``
  still reaches back to its position; any other gallery is built from the vectors stored in Redis (never
  re-embedded). Then :meth:`reconcile` replays the log from the oldest position up to one point and
  compares every gallery's count with the store's at that point; a gallery that disagrees is rebuilt. An
  ``activate`` entry replayed on the way makes the process serve the model activated (``follow_activation``).
* Running: :class:`service.follower.Follower` feeds every log entry, this process's own writes included,
  to :meth:`apply`. An entry only names an image; applying it reads that image's *current* vector from
  Redis and puts it in the index (or removes it if gone), under :attr:`lock`. So applying is idempotent
  and order-proof: an index change happens only after Redis was read under the lock, and every Redis
  change is followed by an entry that applies it again, so the index ends equal to the store. The write
  path of this process applies its own changes at once (:meth:`refresh`) for read-your-writes.
* Snapshots (:meth:`snapshot`): periodically and at clean shutdown, under :attr:`lock`, so the manifest's
  stream id is exactly the last entry applied.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

import numpy as np

from index.events import ZERO, Event, parse_id
from index.snapshot import (Manifest, load_snapshot, remove_snapshot, snapshot_galleries, touch_manifest,
                            write_snapshot)
from index.store import RedisStore

from .index_cache import IndexCache, IndexedModel
from .settings import Settings

log = logging.getLogger("reid.service")

HMGET_CHUNK = 1000
RECONCILE_ROUNDS = 3


class IndexSync:
    def __init__(self, store: RedisStore, settings: Settings, cache: IndexCache,
                 follow_activation: Callable[[], object]):
        self.store, self.settings, self.cache = store, settings, cache
        #: called when an ``activate`` entry is replayed here (not under :attr:`lock`): serve the model that the store
        #: records as active, if it is not the one served
        self.follow_activation = follow_activation
        #: held for every change of an index (and of the set of indexes) and while writing snapshots
        self.lock = threading.RLock()
        self._cond = threading.Condition()
        self._applied = ZERO
        self.dirty: set[str] = set()  #: galleries changed since their last snapshot
        self._changes = 0
        self._last_snapshot = time.monotonic()
        #: counters for /metrics and the logs
        self.stats = {"snapshot_loads": 0, "snapshot_writes": 0, "rebuilds": 0, "events_applied": 0,
                      "events_replayed_at_start": 0, "resyncs": 0}
        #: how each gallery's index was obtained at start ("snapshot", or why it was rebuilt)
        self.loaded: dict[str, str] = {}

    # ------------------------------------------------------------------ position in the change log
    @property
    def applied(self) -> str:
        """Id of the last change-log entry applied to the indexes."""
        return self._applied

    def _set_position(self, pos: str) -> None:
        with self._cond:
            self._applied = pos
            self._cond.notify_all()

    def wait_applied(self, target: str, timeout: float) -> bool:
        want = parse_id(target)
        deadline = time.monotonic() + timeout
        with self._cond:
            while parse_id(self._applied) < want:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def wait_caught_up(self, timeout: float = 1.0) -> bool:
        """Wait until every change logged so far is applied here (False on timeout)."""
        return self.wait_applied(self.store.last_event_id(), timeout)

    # ------------------------------------------------------------------ applying changes
    def apply(self, events: list[Event]) -> str | None:
        """Apply change-log entries in order. Returns the bundle id of the last ``activate`` among them, if any
        (the caller switches models: that needs the model lock, which must not be taken under this one)."""
        activate = None
        touched: dict[str, set[int]] = {}
        with self.lock:
            for ev in events:
                if ev.op in ("put", "delete"):
                    try:
                        touched.setdefault(ev.gallery, set()).add(int(ev.ref))
                    except ValueError:
                        log.warning("ignoring change-log entry %s with a bad image id %r", ev.id, ev.ref)
                elif ev.op == "drop":
                    self._refresh_all(touched)
                    touched = {}
                    self.drop(ev.gallery)
                elif ev.op == "activate":
                    activate = ev.ref
            self._refresh_all(touched)
            if events:
                self._set_position(events[-1].id)
                self.stats["events_applied"] += len(events)
        return activate

    def _refresh_all(self, touched: dict[str, set[int]]) -> None:
        for g, ids in touched.items():
            self.refresh(g, sorted(ids))

    def refresh(self, gallery: str, ids: Iterable[int]) -> None:
        """Make the index hold exactly the current stored vectors of ``ids`` (removing those that are gone)."""
        ids = [int(i) for i in ids]
        if not ids:
            return
        with self.lock:
            for start in range(0, len(ids), HMGET_CHUNK):
                part = ids[start:start + HMGET_CHUNK]
                codec, raw = self.store.get_raw_vectors(gallery, part)  # stored as float32 or float16
                idx = self.cache.get(gallery)
                if idx is None:
                    if all(v is None for v in raw):
                        continue  # nothing to add to an index we do not have
                    idx = self.cache.index_for(gallery, create=True)  # built from the store if it exists there
                size = codec.nbytes(idx.dim)
                keep = [(i, v) for i, v in zip(part, raw) if v is not None and len(v) == size]
                gone = [i for i, v in zip(part, raw) if v is None or len(v) != size]
                if gone:
                    idx.remove(gone)
                if keep:
                    vecs = codec.decode_many([v for _, v in keep], idx.dim)  # float32: the index's own
                    idx.add(np.array([i for i, _ in keep], np.int64), vecs)
                self.dirty.add(gallery)
                self._changes += len(part)

    def drop(self, gallery: str) -> None:
        """The gallery was deleted: forget its index and its snapshot."""
        with self.lock:
            self.cache.drop(gallery)
            self.dirty.discard(gallery)
            remove_snapshot(self.settings.snapshot_dir, gallery)

    # ------------------------------------------------------------------ start-up and resynchronisation
    def _index_settings(self) -> dict:
        s = self.settings
        return {k: v for k, v in s.model_dump(mode="json").items() if k.startswith("index_")}

    def load(self) -> None:
        """Build every gallery's index (from its snapshot, else from Redis), then :meth:`reconcile`."""
        t0 = time.perf_counter()
        s, cache, model = self.settings, self.cache, self.cache.model
        info = self.store.change_log_info()  # read before any build: the builds reflect at least this
        galleries = self.store.list_galleries()
        indexes, pos = {}, {}
        for g in galleries:
            idx, why = None, "snapshots disabled (REID_SNAPSHOTS=false)"
            if s.snapshots:
                idx, m, why = load_snapshot(s.snapshot_dir, g, model=model.model_id, dim=model.dim,
                                            index_settings=self._index_settings(),
                                            load_kwargs=cache.load_kwargs(g))
                if idx is not None and info.gap_after(m.stream_id, s.events_maxlen):
                    idx, why = None, (f"the change log no longer reaches back to the snapshot's position "
                                      f"{m.stream_id} (oldest entry {info.first}, newest {info.last})")
            if idx is not None:
                indexes[g], pos[g] = idx, m.stream_id
                self.loaded[g] = "snapshot"
                self.stats["snapshot_loads"] += 1
            else:
                t1 = time.perf_counter()
                indexes[g], pos[g] = cache.build(g), info.last
                self.loaded[g] = f"rebuilt from Redis: {why}"
                self.stats["rebuilds"] += 1
                self.dirty.add(g)
                log.info("gallery %s: %s; rebuilt from Redis (%d vectors) in %.2fs", g, why, len(indexes[g]),
                         time.perf_counter() - t1)
        for g in snapshot_galleries(s.snapshot_dir):
            if g not in indexes:  # deleted while this process was away
                remove_snapshot(s.snapshot_dir, g)
        with self.lock:
            cache.replace(indexes)
            self._set_position(min((pos[g] for g in pos), key=parse_id, default=info.last))
        before = self.stats["events_applied"]
        self.reconcile()
        self.stats["events_replayed_at_start"] = self.stats["events_applied"] - before
        sizes = cache.sizes()
        log.info("indexes ready in %.2fs: %d galleries, %d vectors (%d from snapshots, %d rebuilt from Redis), "
                 "%d change-log entries replayed", time.perf_counter() - t0, len(sizes),
                 sum(n for n, _ in sizes.values()), self.stats["snapshot_loads"], self.stats["rebuilds"],
                 self.stats["events_replayed_at_start"])

    def reconcile(self) -> None:
        """Catch up with the change log and check every gallery's count against the store at one log position.

        Rebuilds from Redis everything when the log no longer reaches back to this process's position (it was
        trimmed, or Redis lost writes), and each gallery whose count disagrees. Replaying an ``activate`` entry
        calls :attr:`follow_activation`."""
        info = self.store.change_log_info()
        if info.gap_after(self.applied, self.settings.events_maxlen):
            self.rebuild_all(f"the change log no longer reaches back to this process's position {self.applied} "
                             f"(oldest entry {info.first}, newest {info.last})", info.last)
            return
        for round_ in range(RECONCILE_ROUNDS):
            counts, members, last = self.store.counts_at_log_position()
            until = last or self.applied
            for batch in self.store.read_events(self.applied, until):
                if self.apply(batch):
                    self.follow_activation()
            bad = self._mismatches(counts, members)
            if not bad:
                return
            if round_ + 1 < RECONCILE_ROUNDS:
                time.sleep(0.05)  # writes racing with the check: look again before rebuilding
        for g, why in bad.items():
            self.rebuild_gallery(g, why)

    def _mismatches(self, counts: dict[str, int], members: set[str]) -> dict[str, str]:
        bad = {}
        with self.lock:
            for g in list(self.cache.all()):
                if g not in members:
                    self.drop(g)  # deleted from the store, and the drop entry is gone
            sizes = self.cache.sizes()
            for g, n in counts.items():
                if g not in members:
                    continue
                have = sum(sizes.get(g, (0, 0)))
                if have != n:
                    bad[g] = f"index has {have} vectors, store has {n}"
        return bad

    def rebuild_gallery(self, gallery: str, why: str) -> None:
        t0 = time.perf_counter()
        idx = self.cache.build(gallery)  # HSCAN; changes made meanwhile arrive as later log entries
        with self.lock:
            self.cache.put(gallery, idx)
            self.dirty.add(gallery)
            self.stats["rebuilds"] += 1
        log.warning("gallery %s: %s; rebuilt from Redis (%d vectors) in %.2fs", gallery, why, len(idx),
                    time.perf_counter() - t0)

    def rebuild_all(self, why: str, position: str) -> None:
        """Rebuild every index from Redis and continue the log from ``position`` (read before the builds)."""
        log.warning("%s: rebuilding every gallery index from Redis", why)
        indexes = {g: self.cache.build(g) for g in self.store.list_galleries()}
        with self.lock:
            self.cache.replace(indexes)
            self.dirty.update(indexes)
            self.stats["rebuilds"] += len(indexes)
            self._set_position(position)  # may move back: Redis may have lost entries this process applied

    # ------------------------------------------------------------------ snapshots
    def snapshot_due(self) -> bool:
        s = self.settings
        if not s.snapshots or not self.dirty:
            return False
        if self._changes >= s.snapshot_changes:
            return True
        return s.snapshot_interval_s > 0 and time.monotonic() - self._last_snapshot >= s.snapshot_interval_s

    def snapshot(self, reason: str) -> int:
        """Write the snapshot of every changed gallery; move the others' manifests to the current position."""
        s = self.settings
        if not s.snapshots:
            return 0
        t0 = time.perf_counter()
        written = 0
        with self.lock:
            pos, model = self.applied, self.cache.model
            for g, idx in self.cache.all().items():
                if g in self.dirty or not touch_manifest(s.snapshot_dir, g, pos):
                    write_snapshot(s.snapshot_dir, idx, Manifest(
                        gallery=g, bundle_id=model.bundle_id, model=model.model_id, dim=idx.dim, count=0,
                        stream_id=pos, index_settings=self._index_settings()))
                    written += 1
            self.dirty.clear()
            self._changes = 0
            self._last_snapshot = time.monotonic()
            self.stats["snapshot_writes"] += written
        if written:
            log.info("%s snapshot of %d gallery index(es) at %s in %.2fs", reason, written, pos,
                     time.perf_counter() - t0)
        return written

    def install(self, model: IndexedModel, indexes: dict) -> None:
        """Serve another model's indexes (built from its stored vectors): the snapshots on disk are of the old one."""
        with self.lock:
            self.cache.install(model, indexes)
            self.dirty.update(indexes)
