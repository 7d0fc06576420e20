"""Follow the change logs (the global one and every gallery's) so that this process's indexes track every
replica's writes.

One background thread per process: an ``XREAD`` of every log from its last applied entry (blocking on one Redis
server; polled on Redis Cluster, :class:`index.events.EventReader`), each batch handed to
:meth:`service.index_sync.IndexSync.apply`; an ``activate`` entry makes this process load the model that
another replica activated. It also writes the periodic snapshots (between batches, so the manifest's
position is exact).

Faults: when Redis goes away the thread keeps retrying (backing off up to 2 s); an embedded redis-server
that died is started again on its port (AOF replayed). Once Redis answers, :meth:`IndexSync.reconcile`
catches up (or rebuilds, if the log was trimmed past this process or Redis lost writes) before following
resumes. ``connected`` and ``error`` feed ``/readyz``.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import redis

from index.redis_server import EmbeddedRedis
from index.store import RedisStore

from .index_sync import IndexSync

log = logging.getLogger("reid.service")

BLOCK_MS = 500
BATCH = 1000
MAX_BACKOFF_S = 2.0


class Follower:
    def __init__(self, store: RedisStore, sync: IndexSync, follow_activation: Callable[[], object],
                 events_maxlen: int, redis_server: EmbeddedRedis | None = None):
        """``follow_activation()``: serve the model that the store records as active (an ``activate`` entry came);
        ``redis_server``: the embedded one, started again if it exits."""
        self.sync, self.follow_activation = sync, follow_activation
        self.events_maxlen, self.redis_server = events_maxlen, redis_server
        self.connected = True
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reid-follower", daemon=True)
        self._events = store.event_reader(BLOCK_MS)

    def start(self) -> "Follower":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._events.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        sync = self.sync
        resync = False
        backoff = 0.1
        while not self._stop.is_set():
            try:
                if resync:
                    sync.stats["resyncs"] += 1
                    sync.reconcile()
                    self.follow_activation()  # a model activated while this process could not see it
                    resync = False
                if not self.connected:
                    log.warning("Redis store reachable again: indexes resynchronised at %s", sync.applied)
                    self.connected, self.error = True, None
                positions = sync.applied
                events = self._events.read(positions, count=BATCH)
                if events:
                    if any(self._events.info(name).gap_after(positions[name], self.events_maxlen)
                           for name in {e.stream for e in events}):
                        resync = True  # trimmed past us while we were behind: rebuild from Redis
                        continue
                    if sync.apply(events):
                        self.follow_activation()
                if sync.snapshot_due():
                    sync.snapshot("periodic")
                backoff = 0.1
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if self.connected:
                    log.warning("lost the Redis store (%s): writes answer 503 until it is back", e)
                self.connected, self.error, resync = False, str(e), True
                self._revive_embedded()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except Exception as e:  # keep following whatever happens; the next round resynchronises
                log.exception("change-log follower failed; resynchronising")
                self.error, resync = repr(e), True
                self._stop.wait(1.0)

    def _revive_embedded(self) -> None:
        srv = self.redis_server
        if srv is None or srv.running or self._stop.is_set():
            return
        log.warning("the embedded redis-server exited (code %s): starting it again on port %s",
                    srv.proc.returncode if srv.proc is not None else None, srv.port)
        try:
            srv.start()
        except Exception as e:  # port taken, binary gone: keep trying at the next round
            log.error("could not restart the embedded redis-server: %s", e)
