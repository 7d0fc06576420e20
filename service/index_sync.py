"""Keep this process's FAISS indexes equal to the Redis store (the truth) across crashes, restarts and replicas.

The indexes themselves are in :class:`service.index_cache.IndexCache`; this class changes them.

The change logs (:mod:`index.events`): one per gallery (its puts and deletes) and a global one (galleries created
and dropped, models activated). This process's position is one entry id per log (:attr:`IndexSync.applied`).

* Start (:meth:`IndexSync.load`): each gallery's snapshot (``{data_dir}/index/<gallery>.faiss`` + manifest)
  is loaded when it was built for the active model and index settings and the gallery's change log
  still reaches back to its position; any other gallery is built from the vectors stored in Redis (never
  re-embedded). Then :meth:`reconcile` replays each log up to one point and compares the gallery's count
  with the store's at that point (read in one transaction in the gallery's slot); a gallery that disagrees is
  rebuilt. An ``activate`` entry replayed on the way makes the process serve the model activated
  (``follow_activation``).
* Running: :class:`service.follower.Follower` feeds every log entry, this process's own writes included,
  to :meth:`apply`. An entry only names an image; applying it reads that image's *current* vector from
  Redis and puts it in the index (or removes it if gone), under :attr:`lock`. So applying is idempotent
  and order-proof: an index change happens only after Redis was read under the lock, and every Redis
  change is followed by an entry that applies it again, so the index ends equal to the store. The write
  path of this process applies its own changes at once (:meth:`refresh`) for read-your-writes.
* Snapshots (:meth:`snapshot`): periodically and at clean shutdown, under :attr:`lock`, so each manifest's
  stream id is exactly the last entry of its gallery's log applied.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

import numpy as np

from index.events import GLOBAL, ZERO, Event, Positions, parse_id
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
        self._applied: Positions = {GLOBAL: ZERO}
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
    def applied(self) -> Positions:
        """Per change log followed (:data:`index.events.GLOBAL` and each gallery), the id of its last entry applied."""
        with self._cond:
            return dict(self._applied)

    def _set_positions(self, positions: Positions, replace: bool = False) -> None:
        with self._cond:
            if replace:
                self._applied = {GLOBAL: ZERO}
            self._applied.update(positions)
            self._cond.notify_all()

    def _forget(self, gallery: str) -> None:
        with self._cond:
            self._applied.pop(gallery, None)

    def wait_applied(self, target: Positions, timeout: float) -> bool:
        """Wait until every log in ``target`` is applied up to its id there (a gallery this process forgot, i.e.
        dropped meanwhile, counts as applied)."""
        deadline = time.monotonic() + timeout

        def behind() -> bool:
            return any(parse_id(self._applied[k]) < parse_id(v) for k, v in target.items() if k in self._applied)

        with self._cond:
            while behind():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def wait_caught_up(self, timeout: float = 1.0) -> bool:
        """Wait until every change logged so far is applied here (False on timeout)."""
        return self.wait_applied(self.store.log_positions(), timeout)

    # ------------------------------------------------------------------ applying changes
    def apply(self, events: list[Event]) -> str | None:
        """Apply change-log entries, each log's in its order, the global log's first (a gallery's ``drop`` and
        ``create`` come before any entry of its next life). Returns the bundle id of the last ``activate`` among
        them, if any (the caller switches models: that needs the model lock, which must not be taken under this
        one)."""
        activate = None
        touched: dict[str, set[int]] = {}
        moved: Positions = {}
        with self.lock:
            for ev in sorted(events, key=lambda e: e.stream != GLOBAL):  # stable: each log keeps its order
                if ev.stream != GLOBAL and ev.stream not in self._applied:
                    continue  # a log of a gallery dropped in this very batch: its next life starts from ZERO
                moved[ev.stream] = ev.id
                if ev.op in ("put", "delete"):
                    try:
                        touched.setdefault(ev.gallery, set()).add(int(ev.ref))
                    except ValueError:
                        log.warning("ignoring change-log entry %s with a bad image id %r", ev.id, ev.ref)
                elif ev.op == "drop":
                    self.drop(ev.gallery)
                    touched.pop(ev.gallery, None)
                    moved.pop(ev.gallery, None)
                elif ev.op == "create":
                    self._set_positions({ev.gallery: self._applied.get(ev.gallery, ZERO)})
                elif ev.op == "activate":
                    activate = ev.ref
            self._refresh_all(touched)
            if events:
                self._set_positions(moved)
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
        """The gallery was deleted: forget its index, its snapshot and its log (a gallery created again under the
        name has a new log, followed from its start)."""
        with self.lock:
            self.cache.drop(gallery)
            self.dirty.discard(gallery)
            self._forget(gallery)
            remove_snapshot(self.settings.snapshot_dir, gallery)

    # ------------------------------------------------------------------ start-up and resynchronisation
    def _index_settings(self) -> dict:
        s = self.settings
        return {k: v for k, v in s.model_dump(mode="json").items() if k.startswith("index_")}

    def load(self) -> None:
        """Build every gallery's index (from its snapshot, else from Redis), then :meth:`reconcile`."""
        t0 = time.perf_counter()
        s, cache, model = self.settings, self.cache, self.cache.model
        galleries = self.store.list_galleries()
        ends = self.store.log_positions(galleries)  # read before any build: the builds reflect at least these
        indexes, pos = {}, {}
        for g in galleries:
            idx, why = None, "snapshots disabled (REID_SNAPSHOTS=false)"
            if s.snapshots:
                idx, m, why = load_snapshot(s.snapshot_dir, g, model=model.model_id, dim=model.dim,
                                            index_settings=self._index_settings(),
                                            load_kwargs=cache.load_kwargs(g))
                info = self.store.change_log_info(g) if idx is not None else None
                if idx is not None and info.gap_after(m.stream_id, s.events_maxlen):
                    idx, why = None, (f"its change log no longer reaches back to the snapshot's position "
                                      f"{m.stream_id} (oldest entry {info.first}, newest {info.last})")
            if idx is not None:
                indexes[g], pos[g] = idx, m.stream_id
                self.loaded[g] = "snapshot"
                self.stats["snapshot_loads"] += 1
            else:
                t1 = time.perf_counter()
                indexes[g], pos[g] = cache.build(g), ends[g]
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
            # the model active now was read before: follow the global log from here
            self._set_positions({GLOBAL: ends[GLOBAL], **pos}, replace=True)
        before = self.stats["events_applied"]
        self.reconcile()
        self.stats["events_replayed_at_start"] = self.stats["events_applied"] - before
        sizes = cache.sizes()
        log.info("indexes ready in %.2fs: %d galleries, %d vectors (%d from snapshots, %d rebuilt from Redis), "
                 "%d change-log entries replayed", time.perf_counter() - t0, len(sizes),
                 sum(n for n, _ in sizes.values()), self.stats["snapshot_loads"], self.stats["rebuilds"],
                 self.stats["events_replayed_at_start"])

    def reconcile(self) -> None:
        """Catch up with every change log and check each gallery's count against the store at one position of its
        log.

        The global log first (galleries created and dropped, activations: replaying an ``activate`` calls
        :attr:`follow_activation`); everything is rebuilt from Redis when it no longer reaches back to this
        process's position (it was trimmed, or Redis lost writes). Then each gallery: rebuilt when its own log no
        longer reaches back, or when its count disagrees."""
        info = self.store.change_log_info(GLOBAL)
        at = self.applied.get(GLOBAL, ZERO)
        if info.gap_after(at, self.settings.events_maxlen):
            self.rebuild_all(f"the global change log no longer reaches back to this process's position {at} "
                             f"(oldest entry {info.first}, newest {info.last})")
            return
        members, last = self.store.galleries_at_log_position()
        self._replay(GLOBAL, last)
        with self.lock:
            for g in list(self.cache.all()):
                if g not in members:
                    self.drop(g)  # deleted from the store, and its drop entry is gone
            self._set_positions({g: ZERO for g in members if g not in self._applied})
        for g in sorted(members):
            self._reconcile_gallery(g)

    def _replay(self, stream: str, until: str) -> None:
        if stream != GLOBAL and stream not in self._applied:
            return  # dropped meanwhile
        for batch in self.store.read_events(stream, self.applied.get(stream, ZERO), until):
            if self.apply(batch):
                self.follow_activation()

    def _reconcile_gallery(self, gallery: str) -> None:
        info = self.store.change_log_info(gallery)
        at = self.applied.get(gallery, ZERO)
        if info.gap_after(at, self.settings.events_maxlen):
            self.rebuild_gallery(gallery, f"its change log no longer reaches back to this process's position {at} "
                                          f"(oldest entry {info.first}, newest {info.last})")
            return
        why = None
        for round_ in range(RECONCILE_ROUNDS):
            n, last = self.store.count_at_log_position(gallery)
            self._replay(gallery, last)
            with self.lock:
                have = sum(self.cache.sizes().get(gallery, (0, 0)))
            if have == n or gallery not in self._applied:
                return
            why = f"index has {have} vectors, store has {n}"
            if round_ + 1 < RECONCILE_ROUNDS:
                time.sleep(0.05)  # writes racing with the check: look again before rebuilding
        self.rebuild_gallery(gallery, why)

    def rebuild_gallery(self, gallery: str, why: str) -> None:
        t0 = time.perf_counter()
        last = self.store.log_positions([gallery])[gallery]  # before the build: it reflects at least this
        idx = self.cache.build(gallery)  # HSCAN; changes made meanwhile arrive as later log entries
        with self.lock:
            self.cache.put(gallery, idx)
            self.dirty.add(gallery)
            self.stats["rebuilds"] += 1
            self._set_positions({gallery: last})  # may move back: Redis may have lost entries applied here
        log.warning("gallery %s: %s; rebuilt from Redis (%d vectors) in %.2fs", gallery, why, len(idx),
                    time.perf_counter() - t0)

    def rebuild_all(self, why: str) -> None:
        """Rebuild every index from Redis and continue every log from where it ends now (read before the builds)."""
        log.warning("%s: rebuilding every gallery index from Redis", why)
        galleries = self.store.list_galleries()
        ends = self.store.log_positions(galleries)
        indexes = {g: self.cache.build(g) for g in galleries}
        with self.lock:
            self.cache.replace(indexes)
            self.dirty.update(indexes)
            self.stats["rebuilds"] += len(indexes)
            self._set_positions(ends, replace=True)  # may move back: Redis may have lost entries applied here

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
            positions, model = self.applied, self.cache.model
            for g, idx in self.cache.all().items():
                pos = positions.get(g, ZERO)  # its own log's
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
            log.info("%s snapshot of %d gallery index(es) in %.2fs", reason, written, time.perf_counter() - t0)
        return written

    def install(self, model: IndexedModel, indexes: dict) -> None:
        """Serve another model's indexes (built from its stored vectors): the snapshots on disk are of the old one."""
        with self.lock:
            self.cache.install(model, indexes)
            self.dirty.update(indexes)
