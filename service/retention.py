"""Per-gallery retention: a background thread deletes the images older than their gallery's ``retention_days``.

Every ``retention_sweep_interval_s`` it deletes, in each gallery that has ``retention_days``, the images whose
time (``captured_at``, else ``created_at``: :func:`service.deletion.image_time`) is before now minus that many
days, exactly as ``DELETE /v1/galleries/{g}/images?before=...`` does (vectors, metadata, kept bytes, index,
change-log entries). With several replicas, a short Redis lock lets one of them sweep per interval. The same
sweep then compacts the vector pages of galleries that deletes (its own, or any other) left half empty
(``vector_compaction_min_pages``, :func:`service.store_maintenance.compact_where_worthwhile`).
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timedelta, timezone

from .deletion import ImageFilter, delete_matching
from .state import ServiceState
from .store_maintenance import compact_where_worthwhile

log = logging.getLogger("reid.service")

LEASE = "retention"  #: the store's lease that one replica holds per interval


class RetentionSweeper:
    def __init__(self, state: ServiceState):
        self.state = state
        self.interval = float(state.settings.retention_sweep_interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token = uuid.uuid4().hex
        self.sweeps = 0  # completed sweeps (tests wait on it)
        self.deleted = 0  # images deleted since start

    def start(self) -> "RetentionSweeper":
        self._thread = threading.Thread(target=self._run, name="retention-sweeper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep_once()
            except Exception as e:  # Redis down, a model switch failing...: try again next interval
                log.warning("retention sweep failed: %s", e)

    def sweep_once(self, now: datetime | None = None) -> dict[str, int]:
        """Delete every expired image now. Returns gallery -> images deleted (galleries with retention only);
        empty if another replica holds this interval's lock."""
        store = self.state.store
        # One replica per interval: the lock expires by itself shortly before the next sweep.
        ttl_ms = max(int(self.interval * 1000 * 0.9), 1)
        if not store.hold_lease(LEASE, self._token, ttl_ms):
            return {}
        now = now or datetime.now(timezone.utc)
        out: dict[str, int] = {}
        for gallery, days in store.galleries_with_retention().items():
            flt = ImageFilter(before=now - timedelta(days=days))
            n = delete_matching(self.state, gallery, flt)
            out[gallery] = n
            if n:
                log.info("retention: deleted %d image(s) older than %d day(s) from gallery %s", n, days, gallery)
        compact_where_worthwhile(store, self.state.settings.vector_compaction_min_pages)
        self.sweeps += 1
        self.deleted += sum(out.values())
        return out
