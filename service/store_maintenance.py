"""Store maintenance that an operator runs from the command line (``reid migrate-store``, ``reid gc-blobs``,
``reid compact-store``), and the compaction the retention sweeper runs by itself.

They work on the store the service's settings name (REID_REDIS_URL, else the embedded server under
REID_DATA_DIR: the running service's if it is up, else one started for the command) and on its blob directory
(REID_BLOB_DIR). All are safe while the service runs: they go through the store's transactions and removal
marks like any write (index/store.py).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from index.redis_server import EmbeddedRedis
from index.store import Compaction, MigrationResult, RedisStore
from index.store_layout import migrate_layout

from .settings import Settings

log = logging.getLogger("reid.service")


@contextmanager
def open_store(settings: Settings, migrate: bool = True) -> Iterator[RedisStore]:
    """The settings' store, with kept bytes going to disk (the blob directory); its key layout migrated unless
    ``migrate`` is False (the caller does it)."""
    server, url = None, settings.redis_url
    if not url:
        embedded = EmbeddedRedis(settings.redis_data_dir, appendfsync=settings.redis_appendfsync)
        url = embedded.running_url()  # never a second server on the running service's AOF
        if url is None:
            server = embedded.start()
            url = server.url
    store = RedisStore(url, **{**settings.store_options(), "image_storage": "disk"})
    try:
        if migrate:
            migrate_layout(store)  # as the service does at start: this code reads the current layout only
        yield store
    finally:
        store.close()
        if server is not None:
            server.stop()


def compact_where_worthwhile(store: RedisStore, min_pages: int) -> dict[str, Compaction]:
    """Compact the vector pages of each gallery where at least ``min_pages`` pages could be freed (0: none)."""
    done = {}
    for gallery in store.list_galleries() if min_pages > 0 else ():
        if store.freeable_pages(gallery) >= min_pages:
            done[gallery] = store.compact_vectors(gallery)
            log.info("gallery %s: %d image(s) moved, vector pages %d -> %d", gallery, done[gallery].moved,
                     done[gallery].pages_before, done[gallery].pages_after)
    return done


def migrate_bytes_to_disk(store: RedisStore) -> dict[str, MigrationResult]:
    """Move every gallery's kept bytes that are still inside Redis to the blob directory."""
    results = {}
    for gallery in sorted(store.image_bytes_in_redis()):
        results[gallery] = store.migrate_image_bytes(gallery)
        log.info("gallery %s: %s", gallery, results[gallery])
    return results
