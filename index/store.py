"""Redis store: the source of truth for galleries, image metadata and vectors.

The FAISS index (:mod:`index.vector_index`) is only a cache of what is written here.

Key layout 2 (all keys prefixed ``reid:``; gallery names match :data:`GALLERY_NAME_RE`, so they never contain
``:`` or braces). Every key of a gallery carries the gallery's name as its Redis Cluster hash tag (``{g}``), so
all of them live in one hash slot, on one node, and each change to a gallery is one MULTI/EXEC there; every key
that is no gallery's carries the tag ``{global}``. The same layout serves one Redis server and Redis Cluster
(``cluster=True``); :func:`index.store_layout.migrate_layout` renames a store of layout 1 (the same names
without the braces, one change log ``reid:events`` for everything).

    reid:{global}:galleries             SET    names of all galleries
    reid:{global}:events                STREAM the global change log: op=create|drop|activate, gallery, id
    reid:{global}:layout                STRING "2"
    reid:gallery:{g}                    HASH   name, created_at (ISO 8601 UTC), retention_days (optional),
                                               vector_dtype (float32|float16: how :vectors holds this gallery's
                                               vectors; absent = float32, the layout before it was recorded)
    reid:gallery:{g}:vectors            HASH   {image id (decimal)} -> vector bytes, little endian, of the
                                               gallery's vector_dtype (:mod:`index.vector_codec`)
    reid:gallery:{g}:image:{id}         HASH   external_id, camera_id, person_id, captured_at, filename,
                                               created_at, model, dim (records written before the blob
                                               store also hold id and gallery, which the key already names)
    reid:gallery:{g}:blobs              HASH   {image id} -> sha256 (32 raw bytes) of the image's kept bytes,
                                               a blob in ``{blob_dir}/{g}/`` (:mod:`index.blob_store`)
    reid:gallery:{g}:images             HASH   {image id} -> the original image bytes inside Redis: the layout
                                               before the blob store, still written with image_storage="redis"
                                               and always read as a fallback (:meth:`RedisStore.migrate_image_bytes`
                                               moves them to disk)
    reid:gallery:{g}:blob-removing:{sha256 hex}
                                        STRING the token of a remover while it removes that blob's file
                                               (expires after :data:`BLOB_MARK_TTL_MS`)
    reid:gallery:{g}:vectors:staged     HASH   like :vectors, written by a model activation before it
                                               replaces :vectors in one transaction
    reid:gallery:{g}:events             STREAM the gallery's change log (op=put|delete, id), written in the same
                                               transaction as each change, capped at ~``events_maxlen`` entries
                                               (approximate trimming), for replicas to follow (index.events)
    reid:{global}:blob_store            STRING identity of the blob directory the kept bytes are in (the same
                                               is written in it, :func:`index.blob_store.claim_identity`)
    reid:{global}:active_bundle         STRING id of the model bundle whose vectors the store holds
    reid:{global}:lock:{name}           STRING a lease that one replica holds for a periodic chore
                                               (:meth:`RedisStore.hold_lease`; ``retention`` sweeps)
    reid:{global}:job:{id}, …:jobs:…    background jobs' records and locks (index.job_store)

A gallery is listed (the global set, and a ``create`` entry in the global log) before anything of it is written,
and unlisted (with a ``drop`` entry) before its keys are deleted: these are two slots, so two steps. A crash between
them leaves at worst a listed empty gallery, or keys of an unlisted one that the next delete or create replaces.

Nothing outside this package reads or writes these keys itself: it calls the methods here.

Image ids are stable: the first 8 bytes of ``sha256(gallery + b"\\0" + image bytes)`` read
big-endian with the top bit cleared (a positive signed 63-bit integer). Re-uploading the
same bytes to the same gallery gives the same id.

Writes of images (vector + metadata + kept-bytes reference + change event) happen in one
MULTI/EXEC transaction guarded by WATCH on the image keys (:meth:`RedisStore.put_many`), so
a reader never sees half an image and two concurrent uploads of the same bytes report
exactly one ``created``.

Kept image bytes on disk (``image_storage="disk"``). Each gallery has its own content-addressed blob folder
``{blob_dir}/{g}/``, so a blob is referenced by at most one record: the image of that gallery whose id is
``image_id(g, bytes)`` (put_many refuses kept bytes under any other id). Two galleries holding the same bytes
hold two blobs, and removing one never touches the other. The rules:

* Write: the blob is written and fsynced (:meth:`BlobStore.put`) *inside* the WATCH of the transaction that
  then records its reference, before EXEC. A crash or a failed EXEC in between leaves at worst an orphan
  blob, never a record pointing to a missing one; :func:`index.blob_gc.sweep_orphan_blobs` removes orphans.
* Remove (delete, retention, gallery deletion, the sweep): the reference is dropped and a removal mark
  ``…:blob-removing:{sha256}`` set in ONE transaction; then the file is renamed to a trash name, the mark read
  back, and the trash unlinked only if the mark is still this remover's (else put back: the mark ran out and a
  writer may have referenced the blob again); then the mark is released.
* A writer WATCHes the marks of the blobs it writes and waits while one is set; a mark set after its WATCH
  aborts its EXEC (it retries and rewrites the blob). So a writer never records a reference to a blob that a
  remover is about to unlink, even when the same image is deleted and uploaded again at the same moment.

Durability: with ``wait_aof_ms`` set (a server running ``appendfsync everysec``/``no`` that has
WAITAOF, see :mod:`index.durability`), every write transaction is followed by ``WAITAOF 1 0`` on its
connection, so it returns only once the change is fsynced to the AOF; with ``wait_replicas`` set (Redis Cluster,
or any primary with replicas), by ``WAIT n``, so it returns only once that many replicas hold the change and a
failover to one of them loses nothing acknowledged.

Metadata values are stored and returned as strings (``camera_id`` "1" stays "1"); fields
that were not given are absent (returned as ``None``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from .blob_store import BlobError, BlobMissing, BlobStore, blob_key, claim_identity, read_identity
from .durability import Persistence, WriteWait, durable_pipeline, probe
from .events import GLOBAL, ZERO, EventReader, Positions, StreamInfo, read_range, stream_info
from .job_store import JobStore
from .vector_codec import VectorCodec

__all__ = [
    "BLOB_MARK_TTL_MS",
    "ClusterUnsupported",
    "GALLERY_NAME_RE",
    "IMAGE_STORAGES",
    "METADATA_FIELDS",
    "InvalidGalleryName",
    "MigrationResult",
    "RedisStore",
    "StagingStale",
    "StoredImage",
    "connect",
    "image_id",
    "validate_gallery_name",
]

log = logging.getLogger("reid.index")

PREFIX = "reid:"
#: the keys that are no gallery's: one hash tag, so one slot, so they may change together in one transaction
GLOBAL_PREFIX = PREFIX + "{global}:"
#: the key layout this code reads and writes (:mod:`index.store_layout`)
LAYOUT = "2"
GALLERY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: user-supplied metadata fields (strings)
METADATA_FIELDS = ("external_id", "camera_id", "person_id", "captured_at", "filename")
EVENTS_MAXLEN = 100_000
#: fields of a gallery's settings hash that the store manages itself (others: :meth:`RedisStore.set_gallery_field`)
GALLERY_OWN_FIELDS = ("name", "created_at", "retention_days", "vector_dtype", "deleting")
#: where kept image bytes go: files in the blob directory, or (the layout before it) a hash inside Redis
IMAGE_STORAGES = ("disk", "redis")
#: a removal mark outlives any removal (a rename and an unlink); it expires so a crashed remover blocks nobody
BLOB_MARK_TTL_MS = 60_000
#: a gallery's vectors without a vector_dtype record were written as float32 (the only layout before it)
LEGACY_DTYPE = "float32"

# Set and remove fields of an image's record only if it exists (no record resurrected by a late PATCH).
_PATCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  local k, v = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  if v == '' then redis.call('HDEL', KEYS[1], k) else redis.call('HSET', KEYS[1], k, v) end
end
return 1
"""

# The sweep's claim on a blob nobody references: set the removal mark only if the gallery's image that could
# reference it (KEYS[1] field ARGV[1]) does not, and no other remover holds it. Atomic, unlike a read then a SET.
_CLAIM_UNREFERENCED = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return 1
"""

# Release removal marks that are still ARGV[1]'s (one that ran out may be another remover's by now).
_RELEASE_MARKS = """
local n = 0
for _, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then redis.call('DEL', k); n = n + 1 end
end
return n
"""


class InvalidGalleryName(ValueError):
    pass


class ClusterUnsupported(RuntimeError):
    """An operation that needs one transaction over several galleries, which Redis Cluster cannot run."""


class StagingStale(RuntimeError):
    """The staged vectors no longer cover exactly the gallery's images (a write happened meanwhile)."""


class _BlobBusy(Exception):
    """A blob a write needs is being removed right now: wait for its removal mark to go, then write again."""


@dataclass(frozen=True)
class MigrationResult:
    """:meth:`RedisStore.migrate_image_bytes` of one gallery: images whose bytes moved to disk, entries dropped
    because their image is gone, and entries left in Redis because their id is not the bytes' content id."""

    moved: int = 0
    dropped: int = 0
    skipped: int = 0


def connect(url: str, cluster: bool = False, socket_timeout: float = 5.0) -> redis.Redis | RedisCluster:
    """A client for ``url``: one server, or (``cluster``) the Redis Cluster that the node at ``url`` belongs to."""
    options = dict(decode_responses=False, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                   # Fail fast (then 503 + Retry-After upstream) instead of redis-py's multi-second default.
                   retry=Retry(ExponentialBackoff(cap=0.25, base=0.02), retries=2))
    if cluster:
        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, health_check_interval=30, **options)


def validate_gallery_name(name: str) -> str:
    if not isinstance(name, str) or not GALLERY_NAME_RE.match(name):
        raise InvalidGalleryName(
            f"invalid gallery name {name!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return name


def image_id(gallery: str, data: bytes) -> int:
    """Stable positive 63-bit id of ``data`` within ``gallery``."""
    h = hashlib.sha256(gallery.encode("utf-8") + b"\0" + bytes(data)).digest()
    return int.from_bytes(h[:8], "big") & ((1 << 63) - 1)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _s(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8")
    return str(v)


@dataclass(frozen=True)
class StoredImage:
    id: int
    gallery: str
    metadata: dict[str, str | None]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "gallery": self.gallery, **self.metadata}


class RedisStore:
    """Galleries, image metadata and vectors in Redis.

    ``client`` may be a ``redis.Redis``, a ``redis.cluster.RedisCluster`` or a URL (``redis://host:port/db``,
    ``unix:///path/to/sock``); with ``cluster=True`` the URL names any one node of a Redis Cluster and the client
    finds the rest.

    ``blob_dir``: where kept image bytes live on disk (one folder per gallery); ``image_storage`` says where new
    ones go: "disk" (the default when there is a blob_dir) or "redis" (the hash ``…:images``, the layout before
    the blob store; the default without a blob_dir). Bytes are read from wherever they are.
    ``vector_dtype``: how the vectors of galleries created from now on are stored (float32 or float16); a
    gallery keeps the dtype it was created with (``vector_dtype`` in its settings hash).
    """

    def __init__(self, client: redis.Redis | RedisCluster | str, socket_timeout: float = 5.0,
                 events_maxlen: int = EVENTS_MAXLEN, wait_aof_ms: int | None = None,
                 blob_dir: str | os.PathLike | None = None, image_storage: str | None = None,
                 vector_dtype: str = "float32", cluster: bool = False, wait_replicas: int = 0,
                 wait_replicas_ms: int = 2000):
        if isinstance(client, str):
            client = connect(client, cluster=cluster, socket_timeout=socket_timeout)
        self.r: redis.Redis = client
        #: Redis Cluster: no transaction may span two hash slots, and blocking reads cover one stream at a time
        self.cluster = isinstance(client, RedisCluster)
        self._novalues: bool | None = None  # whether HSCAN ... NOVALUES works (Redis >= 7.4); None: untried
        self.events_maxlen = int(events_maxlen)
        #: WAITAOF timeout after each write transaction; None: the server's own fsync policy is enough
        self.wait_aof_ms = wait_aof_ms
        #: replicas that must hold each write before it is acknowledged (WAIT), and how long to wait for them
        self.wait_replicas, self.wait_replicas_ms = int(wait_replicas), int(wait_replicas_ms)
        self._patch = client.register_script(_PATCH)
        self._claim_unreferenced = client.register_script(_CLAIM_UNREFERENCED)
        self._release_marks = client.register_script(_RELEASE_MARKS)
        self.blob_dir = Path(blob_dir) if blob_dir is not None else None
        self.image_storage = image_storage or ("disk" if self.blob_dir is not None else "redis")
        if self.image_storage not in IMAGE_STORAGES:
            raise ValueError(f"image_storage must be one of {IMAGE_STORAGES}, not {self.image_storage!r}")
        if self.image_storage == "disk" and self.blob_dir is None:
            raise ValueError('image_storage="disk" needs a blob_dir')
        #: the dtype new galleries' vectors are stored in
        self.codec = VectorCodec.named(vector_dtype)

    def _pipeline(self) -> redis.client.Pipeline:
        """A MULTI/EXEC pipeline for a change: followed by WAITAOF when ``wait_aof_ms`` is set and by WAIT when
        ``wait_replicas`` is."""
        return durable_pipeline(self.r, WriteWait(self.wait_aof_ms, self.wait_replicas, self.wait_replicas_ms))

    def _transaction(self, func: Callable[[redis.client.Pipeline], None], *watches: str) -> list:
        """``redis.Redis.transaction`` through :meth:`_pipeline` (WATCH, func, EXEC; again on WatchError). ``func``
        may queue nothing (returns []: nothing to do)."""
        with self._pipeline() as pipe:
            while True:
                try:
                    if watches:
                        pipe.watch(*watches)
                    func(pipe)
                    if not len(pipe):
                        pipe.reset()
                        return []
                    return pipe.execute()
                except redis.WatchError:
                    continue

    def _event(self, pipe: redis.client.Pipeline, op: str, gallery: str, ref: str) -> None:
        """An entry of the gallery's own change log (in the gallery's slot, so in its transaction)."""
        pipe.xadd(self.k_gallery_events(gallery), {"op": op, "id": ref}, maxlen=self.events_maxlen, approximate=True)

    def _global_event(self, pipe: redis.client.Pipeline, op: str, gallery: str, ref: str) -> None:
        pipe.xadd(self.k_events(), {"op": op, "gallery": gallery, "id": ref}, maxlen=self.events_maxlen,
                  approximate=True)

    def stream_key(self, stream: str) -> str:
        """The key of a change log: :data:`index.events.GLOBAL` or a gallery's."""
        return self.k_events() if stream == GLOBAL else self.k_gallery_events(stream)

    def log_positions(self, galleries: Iterable[str] | None = None) -> Positions:
        """The newest entry id of the global log and of each gallery's (default: every listed one), ZERO where a log
        is empty; one round trip per node."""
        names = [GLOBAL, *(self.list_galleries() if galleries is None else galleries)]
        pipe = self.r.pipeline(transaction=False)
        for n in names:
            pipe.xrevrange(self.stream_key(n), count=1)
        return {n: (last[0][0].decode() if last else ZERO) for n, last in zip(names, pipe.execute())}

    def change_log_info(self, stream: str = GLOBAL) -> StreamInfo:
        return stream_info(self.r, self.stream_key(stream))

    def read_events(self, stream: str, after: str, until: str) -> Iterator[list]:
        """Batches of one change log's entries with ``after < id <= until``."""
        return read_range(self.r, self.stream_key(stream), after, until, stream)

    def event_reader(self, block_ms: int) -> EventReader:
        """A reader of new change-log entries on a connection of its own: a blocking XREAD holds its connection, so it
        must not share the request pool, nor its socket timeout (shorter than ``block_ms`` may be). Redis Cluster
        reads without blocking (:class:`index.events.EventReader`), so there the store's client serves."""
        if self.cluster:
            return EventReader(self.r, self.stream_key, block_ms, cluster=True, owns_client=False)
        pool = self.r.connection_pool
        client = redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class,
            **{**pool.connection_kwargs, "socket_timeout": block_ms / 1000 + 5.0}))
        return EventReader(client, self.stream_key, block_ms)

    # ------------------------------------------------------------------ keys
    # A gallery's keys: "reid:gallery:{g}" and "reid:gallery:{g}:<part>", all in the slot of the hash tag {g}.
    @staticmethod
    def k_gallery(g: str) -> str:
        return f"{PREFIX}gallery:{{{g}}}"

    @classmethod
    def k_vectors(cls, g: str) -> str:
        return cls.k_gallery(g) + ":vectors"

    @classmethod
    def k_image(cls, g: str, id_: int) -> str:
        return f"{cls.k_gallery(g)}:image:{int(id_)}"

    @classmethod
    def k_images(cls, g: str) -> str:
        return cls.k_gallery(g) + ":images"

    @classmethod
    def k_blobs(cls, g: str) -> str:
        return cls.k_gallery(g) + ":blobs"

    @classmethod
    def k_blob_mark(cls, g: str, key: str) -> str:
        return f"{cls.k_gallery(g)}:blob-removing:{key}"

    @classmethod
    def k_staged(cls, g: str) -> str:
        return cls.k_gallery(g) + ":vectors:staged"

    @classmethod
    def k_gallery_events(cls, g: str) -> str:
        return cls.k_gallery(g) + ":events"

    # The global keys, all in the slot of the hash tag {global}.
    @staticmethod
    def k_galleries() -> str:
        return GLOBAL_PREFIX + "galleries"

    @staticmethod
    def k_events() -> str:
        return GLOBAL_PREFIX + "events"

    @staticmethod
    def k_layout() -> str:
        return GLOBAL_PREFIX + "layout"

    @staticmethod
    def k_blob_store() -> str:
        return GLOBAL_PREFIX + "blob_store"

    @staticmethod
    def k_active_bundle() -> str:
        return GLOBAL_PREFIX + "active_bundle"

    @staticmethod
    def k_lease(name: str) -> str:
        return f"{GLOBAL_PREFIX}lock:{name}"

    # ------------------------------------------------------------------ basics
    def ping(self) -> bool:
        return bool(self.r.ping())

    def close(self) -> None:
        try:
            self.r.close()
        except Exception:  # pragma: no cover - best effort
            pass

    def probe_persistence(self, required: str = "always") -> Persistence:
        """How the server persists acknowledged writes (:func:`index.durability.probe`)."""
        return probe(self.r, required)

    def job_store(self) -> JobStore:
        """The background jobs' records and locks, on this store's connections."""
        return JobStore(self.r)

    def hold_lease(self, name: str, token: str, ttl_ms: int) -> bool:
        """Take the lease ``name`` for ``token`` unless another token holds it; True if ``token`` holds it now. It
        expires by itself after ``ttl_ms`` (so one replica does a periodic chore per period, and a dead one frees it)."""
        key = self.k_lease(name)
        if self.r.set(key, token, nx=True, px=ttl_ms):
            return True
        return self.r.get(key) == token.encode()

    # ------------------------------------------------------------------ galleries
    def create_gallery(self, gallery: str, retention_days: int | None = None) -> bool:
        """Create the gallery if missing. Returns True if it was created (``retention_days`` is set only then)."""
        validate_gallery_name(gallery)
        created = self._list_gallery(gallery)
        if created and self.r.hexists(self.k_gallery(gallery), "deleting"):
            self._delete_keys(gallery)  # left by a delete that crashed half-way: they belong to no gallery
        pipe = self._pipeline()
        self._init_settings(pipe, gallery, _now(), self.codec.name if created else None)
        if created and retention_days is not None:
            pipe.hset(self.k_gallery(gallery), "retention_days", str(int(retention_days)))
        pipe.execute()
        return created

    def _list_gallery(self, gallery: str) -> bool:
        """Add the gallery to the listing, with a ``create`` entry in the global log if it was not listed (one
        transaction in the global slot). Returns whether it was new."""
        def txn(pipe: redis.client.Pipeline) -> None:
            if pipe.sismember(self.k_galleries(), gallery):
                return
            pipe.multi()
            pipe.sadd(self.k_galleries(), gallery)
            self._global_event(pipe, "create", gallery, "")

        res = self._transaction(txn, self.k_galleries())
        return bool(res) and bool(res[0])

    def _init_settings(self, pipe: redis.client.Pipeline, gallery: str, now: str, dtype: str | None) -> None:
        pipe.hsetnx(self.k_gallery(gallery), "name", gallery)
        pipe.hsetnx(self.k_gallery(gallery), "created_at", now)
        if dtype is not None:
            pipe.hsetnx(self.k_gallery(gallery), "vector_dtype", dtype)

    def gallery_exists(self, gallery: str) -> bool:
        if not GALLERY_NAME_RE.match(gallery or ""):
            return False
        return bool(self.r.sismember(self.k_galleries(), gallery))

    def list_galleries(self) -> list[str]:
        return sorted(_s(x) for x in self.r.smembers(self.k_galleries()))

    def count(self, gallery: str) -> int:
        return int(self.r.hlen(self.k_vectors(gallery)))

    def counts(self, galleries: Iterable[str] | None = None) -> dict[str, int]:
        """Gallery -> its number of images (stored vectors), for ``galleries`` (default: every one), in one round
        trip."""
        names = self.list_galleries() if galleries is None else list(galleries)
        pipe = self.r.pipeline(transaction=False)
        for g in names:
            pipe.hlen(self.k_vectors(g))
        return {g: int(n) for g, n in zip(names, pipe.execute())}

    def galleries_at_log_position(self) -> tuple[set[str], str]:
        """``(galleries, last)``: the listing and the newest entry of the global log (ZERO while empty), read in ONE
        MULTI/EXEC, so the listing is exactly what that log reflects up to ``last``."""
        pipe = self.r.pipeline(transaction=True)
        pipe.smembers(self.k_galleries())
        pipe.xrevrange(self.k_events(), count=1)
        members, last = pipe.execute()
        return {_s(m) for m in members}, (last[0][0].decode() if last else ZERO)

    def count_at_log_position(self, gallery: str) -> tuple[int, str]:
        """``(count, last)``: the gallery's number of images and the newest entry of its log (ZERO while empty), read
        in ONE MULTI/EXEC (one slot), so the count is exactly what its log reflects up to ``last``."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hlen(self.k_vectors(gallery))
        pipe.xrevrange(self.k_gallery_events(gallery), count=1)
        n, last = pipe.execute()
        return int(n), (last[0][0].decode() if last else ZERO)

    def images_without_bytes(self) -> dict[str, int]:
        """Gallery -> how many of its images have no kept bytes, for the galleries that have such images."""
        names = self.list_galleries()
        pipe = self.r.pipeline(transaction=False)
        for g in names:
            pipe.hlen(self.k_vectors(g))
            pipe.hlen(self.k_images(g))
            pipe.hlen(self.k_blobs(g))
        res = pipe.execute()
        missing = {g: int(n) - int(in_redis) - int(on_disk)
                   for g, n, in_redis, on_disk in zip(names, res[::3], res[1::3], res[2::3])}
        return {g: n for g, n in missing.items() if n > 0}

    def gallery_info(self, gallery: str) -> dict[str, Any] | None:
        """``{"name", "count", "created_at", "retention_days"}`` or None if the gallery does not exist."""
        if not self.gallery_exists(gallery):
            return None
        pipe = self.r.pipeline(transaction=True)
        pipe.hlen(self.k_vectors(gallery))
        pipe.hmget(self.k_gallery(gallery), "created_at", "retention_days")
        return _gallery_info(gallery, *pipe.execute())

    def list_gallery_info(self) -> list[dict[str, Any]]:
        """:meth:`gallery_info` of every gallery, in one round trip after the listing."""
        names = self.list_galleries()
        pipe = self.r.pipeline(transaction=False)
        for g in names:
            pipe.hlen(self.k_vectors(g))
            pipe.hmget(self.k_gallery(g), "created_at", "retention_days")
        res = pipe.execute()
        return [_gallery_info(g, n, fields) for g, n, fields in zip(names, res[::2], res[1::2])]

    def set_gallery_field(self, gallery: str, field: str, value: str) -> None:
        """Keep ``value`` under ``field`` in the gallery's settings hash: every replica reads it, and it goes with the
        gallery. Not for the fields the store manages itself (:data:`GALLERY_OWN_FIELDS`)."""
        if field in GALLERY_OWN_FIELDS:
            raise ValueError(f"the gallery field {field!r} is the store's own")
        self.r.hset(self.k_gallery(gallery), field, value)

    def get_gallery_field(self, gallery: str, field: str) -> str | None:
        return _s(self.r.hget(self.k_gallery(gallery), field))

    def delete_gallery(self, gallery: str, batch: int = 500) -> bool:
        """Delete a gallery and all its images. Returns False if it did not exist."""
        if not self.gallery_exists(gallery):
            return False
        # Marked, so that a create after a crash half-way knows its leftovers; then dropped from the listing, so
        # nobody finds a half-deleted gallery; then its keys go.
        self.r.hset(self.k_gallery(gallery), "deleting", "1")
        pipe = self._pipeline()
        pipe.srem(self.k_galleries(), gallery)
        self._global_event(pipe, "drop", gallery, "")
        pipe.execute()
        self._delete_keys(gallery, batch)
        return True

    def _delete_keys(self, gallery: str, batch: int = 500) -> None:
        """Delete every key of an unlisted gallery (and its blobs); its settings last, so a crash half-way leaves them
        for :meth:`create_gallery` to find."""
        keys: list[str] = []
        for field, _ in self.r.hscan_iter(self.k_vectors(gallery), count=batch):
            keys.append(self.k_image(gallery, int(field)))
            if len(keys) >= batch:
                self.r.delete(*keys)
                keys.clear()
        if keys:
            self.r.delete(*keys)
        self._drop_all_blobs(gallery, batch)
        self.r.delete(self.k_vectors(gallery), self.k_images(gallery), self.k_blobs(gallery), self.k_staged(gallery),
                      self.k_gallery_events(gallery), self.k_gallery(gallery))
        if self.blob_dir is not None:
            self._blobs(gallery).prune_empty_dirs()

    def _drop_all_blobs(self, gallery: str, batch: int) -> None:
        """Drop every kept-bytes reference of the gallery and remove the blobs, a batch at a time (each batch's
        references go in one transaction with its removal marks, as :meth:`delete_many` does)."""
        chunk: dict[bytes, bytes] = {}
        for field, raw in self.r.hscan_iter(self.k_blobs(gallery), count=batch):
            chunk[field] = raw
            if len(chunk) >= batch:
                self._drop_blob_refs(gallery, chunk)
                chunk = {}
        if chunk:
            self._drop_blob_refs(gallery, chunk)

    def _drop_blob_refs(self, gallery: str, refs: Mapping[bytes, bytes]) -> None:
        token = uuid.uuid4().hex
        keys = {raw.hex() for raw in refs.values()}
        pipe = self._pipeline()
        pipe.hdel(self.k_blobs(gallery), *refs)
        for key in keys:
            pipe.set(self.k_blob_mark(gallery, key), token, px=BLOB_MARK_TTL_MS)
        pipe.execute()
        self._remove_blobs(gallery, keys, token)

    # ------------------------------------------------------------------ images
    def exists(self, gallery: str, id_: int) -> bool:
        return bool(self.r.exists(self.k_image(gallery, id_)))

    def exists_many(self, gallery: str, ids: Iterable[int]) -> list[bool]:
        """Whether each image exists, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.exists(self.k_image(gallery, i))
        return [bool(x) for x in pipe.execute()]

    def put(
        self,
        gallery: str,
        id_: int,
        vector: np.ndarray,
        metadata: Mapping[str, Any] | None = None,
        model: str | None = None,
    ) -> bool:
        """Store one image atomically. Returns True if it already existed (nothing written).

        Creates the gallery if needed.
        """
        return self.put_many(gallery, [(id_, vector, metadata)], model=model)[0]

    def put_many(
        self,
        gallery: str,
        records: list[tuple[int, np.ndarray, Mapping[str, Any] | None]],
        model: str | None = None,
        images: Sequence[bytes | None] | None = None,
    ) -> list[bool]:
        """Store several images ``(id, vector, metadata)`` in ONE MULTI/EXEC transaction.

        ``images``, aligned with ``records``, are the original bytes to keep (None: keep none); on disk (the
        blob store, fsynced before EXEC) or in Redis, by ``image_storage``. On disk an image's id must be its
        content id, ``image_id(gallery, bytes)`` (what makes a blob one image's: see the module docstring).
        Returns, per record, whether it already existed (existing images are left untouched).
        WATCH on the image keys makes a concurrent writer of the same id abort and retry this
        transaction, so each id is reported ``created`` exactly once. One transaction means one
        AOF fsync for the whole batch.
        """
        validate_gallery_name(gallery)
        if not records:
            return []
        if images is not None and len(images) != len(records):
            raise ValueError(f"got {len(images)} images for {len(records)} records")
        kept = [None if b is None else bytes(b) for b in images] if images is not None else [None] * len(records)
        on_disk = self.image_storage == "disk"
        now = _now()
        prepared = []
        for (id_, vector, metadata), data in zip(records, kept):
            vec = np.asarray(vector, dtype=np.float32).reshape(-1)
            meta = {k: _s(v) for k, v in (metadata or {}).items() if k in METADATA_FIELDS and v is not None}
            # id and gallery are not stored: the key names both
            meta.update({"created_at": now, "dim": str(vec.shape[0])})
            if model:
                meta["model"] = model
            key = None
            if data is not None and on_disk:
                if image_id(gallery, data) != int(id_):
                    raise ValueError(f"image {int(id_)}: kept bytes on disk need their content id, "
                                     f"image_id(gallery, bytes) = {image_id(gallery, data)}")
                key = blob_key(data)
            prepared.append((int(id_), self.k_image(gallery, id_), vec, meta, data, key))
        image_keys = [k for _, k, _, _, _, _ in prepared]
        marks = sorted({self.k_blob_mark(gallery, key) for *_, key in prepared if key is not None})
        existed: list[bool] = []

        def txn(pipe: redis.client.Pipeline) -> None:
            nonlocal existed
            # The WATCHed keys' state, read in one round trip on another connection (any change after WATCH
            # still aborts EXEC).
            existed, dtype, busy, listed = self._write_state(gallery, [id_ for id_, *_ in prepared], marks)
            if busy:
                raise _BlobBusy(busy)
            if listed is not True and not all(existed):
                if listed == "leftovers":  # of a delete that crashed half-way: not this gallery's images
                    self._delete_keys(gallery)  # (the WATCHed settings change: this round's EXEC aborts)
                self._list_gallery(gallery)  # listed before anything of it is written (module docstring)
            codec = VectorCodec.named(dtype)
            written: dict[int, tuple[str, dict[str, str]]] = {}  # id -> (image key, metadata)
            vectors: dict[str, bytes] = {}  # one HSET each for the batch's vectors and kept bytes
            in_redis: dict[str, bytes] = {}
            on_disk_refs: dict[str, bytes] = {}
            to_disk: list[bytes] = []
            for (id_, image_key, vec, meta, data, key), ex in zip(prepared, existed):
                if ex or id_ in written:
                    continue
                written[id_] = (image_key, meta)
                vectors[str(id_)] = codec.encode(vec)
                if key is not None:
                    to_disk.append(data)
                    on_disk_refs[str(id_)] = bytes.fromhex(key)
                elif data is not None:
                    in_redis[str(id_)] = data
            # Durable before the references to them are: a crash leaves orphans at worst. One at a time: concurrent
            # writers already overlap their fsyncs (a pool per batch measured no faster with 4 writers).
            blobs = self._blobs(gallery) if to_disk else None
            for data in to_disk:
                blobs.put(data)
            pipe.multi()
            for id_, (image_key, meta) in written.items():
                pipe.hset(image_key, mapping=meta)
                self._event(pipe, "put", gallery, str(id_))
            if vectors:
                pipe.hset(self.k_vectors(gallery), mapping=vectors)
            if in_redis:
                pipe.hset(self.k_images(gallery), mapping=in_redis)
            if on_disk_refs:
                pipe.hset(self.k_blobs(gallery), mapping=on_disk_refs)
            if written:
                self._init_settings(pipe, gallery, now, codec.name)

        # WATCH the gallery's settings too: its vector_dtype is decided by the first write, and a concurrent first
        # write (another replica, maybe another REID_STORE_DTYPE) must not mix two dtypes in one gallery.
        self._transaction_waiting_for_blobs(txn, *image_keys, self.k_gallery(gallery), *marks)
        # a duplicate id inside the batch: the second occurrence "exists"
        seen: set[int] = set()
        out = []
        for (id_, *_), ex in zip(prepared, existed):
            out.append(ex or id_ in seen)
            seen.add(id_)
        return out

    def _write_state(self, gallery: str, ids: list[int], marks: list[str]
                     ) -> tuple[list[bool], str, list[str], bool | str]:
        """``(existed per id, the gallery's vector dtype, the removal marks that are set, listed)`` in one round trip
        (one slot). ``listed``: True when the gallery has settings (it is listed before they are written), False
        when it has none, "leftovers" when they are those of a delete that did not finish."""
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.exists(self.k_image(gallery, i))
        pipe.hmget(self.k_gallery(gallery), "vector_dtype", "name", "deleting")
        pipe.exists(self.k_vectors(gallery))
        for m in marks:
            pipe.exists(m)
        res = pipe.execute()
        existed = [bool(x) for x in res[:len(ids)]]
        (recorded, name, deleting), has_vectors = res[len(ids)], res[len(ids) + 1]
        busy = [m for m, x in zip(marks, res[len(ids) + 2:]) if x]
        # a gallery with vectors but no record is of the layout before the record: float32
        dtype = _s(recorded) or (LEGACY_DTYPE if has_vectors else self.codec.name)
        return existed, dtype, busy, "leftovers" if deleting is not None else name is not None

    def _transaction_waiting_for_blobs(self, func: Callable[[redis.client.Pipeline], None], *watches: str) -> list:
        """:meth:`_transaction`, again after a short wait while a blob it writes is being removed (the removal
        mark expires by itself, so the wait is bounded)."""
        deadline = time.monotonic() + BLOB_MARK_TTL_MS / 1000 + 5.0
        while True:
            try:
                return self._transaction(func, *watches)
            except _BlobBusy as e:
                if time.monotonic() > deadline:
                    raise BlobError(f"blobs still being removed after {BLOB_MARK_TTL_MS} ms: {e}") from None
                time.sleep(0.02)

    def get(self, gallery: str, id_: int) -> StoredImage | None:
        raw = self.r.hgetall(self.k_image(gallery, id_))
        if not raw:
            return None
        d = {_s(k): _s(v) for k, v in raw.items()}
        meta: dict[str, str | None] = {f: d.get(f) for f in METADATA_FIELDS}
        meta["created_at"] = d.get("created_at")
        meta["model"] = d.get("model")
        return StoredImage(id=int(id_), gallery=gallery, metadata=meta)

    def get_many(self, gallery: str, ids) -> list[StoredImage | None]:
        ids = [int(i) for i in ids]
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self.k_image(gallery, i))
        out: list[StoredImage | None] = []
        for i, raw in zip(ids, pipe.execute()):
            if not raw:
                out.append(None)
                continue
            d = {_s(k): _s(v) for k, v in raw.items()}
            meta = {f: d.get(f) for f in METADATA_FIELDS}
            meta["created_at"] = d.get("created_at")
            meta["model"] = d.get("model")
            out.append(StoredImage(id=i, gallery=gallery, metadata=meta))
        return out

    def get_vector(self, gallery: str, id_: int) -> np.ndarray | None:
        """The stored vector as float32 (whatever dtype the gallery stores), or None."""
        return self.get_vectors(gallery, [id_])[0]

    # ------------------------------------------------------------------ vector dtype
    def vector_dtype(self, gallery: str) -> str:
        """How the gallery's vectors are stored: its record, else float32 (galleries from before the record)."""
        return _s(self.r.hget(self.k_gallery(gallery), "vector_dtype")) or LEGACY_DTYPE

    def vector_codec(self, gallery: str) -> VectorCodec:
        return VectorCodec.named(self.vector_dtype(gallery))

    def patch_metadata(self, gallery: str, id_: int, changes: Mapping[str, str | None]) -> bool:
        """Set the metadata fields in ``changes`` (None removes one) if the image exists. Returns False if it does not:
        a late change must not resurrect the record of a deleted image. Only :data:`METADATA_FIELDS`."""
        args: list[str] = []
        for k, v in changes.items():
            if k not in METADATA_FIELDS:
                raise ValueError(f"{k!r} is not a metadata field ({', '.join(METADATA_FIELDS)})")
            if v == "":
                raise ValueError(f"{k}: empty value (None removes the field)")
            args += [k, "" if v is None else str(v)]
        return bool(self._patch(keys=[self.k_image(gallery, id_)], args=[len(args) // 2, *args]))

    def delete(self, gallery: str, id_: int) -> bool:
        """Delete one image (vector, metadata, kept bytes). Returns False if it did not exist."""
        return self.delete_many(gallery, [id_]) == 1

    def iter_vectors(self, gallery: str, batch: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(ids int64 (n,), vectors float32 (n, d))`` batches, via HSCAN (never KEYS).

        Vectors of differing dimension within a batch are split into separate batches.
        """
        codec = self.vector_codec(gallery)  # fixed while the gallery exists
        ids: list[int] = []
        vecs: list[bytes] = []
        for field, value in self.r.hscan_iter(self.k_vectors(gallery), count=batch):
            if vecs and len(value) != len(vecs[0]):
                yield _pack(codec, ids, vecs)
                ids, vecs = [], []
            ids.append(int(field))
            vecs.append(value)
            if len(ids) >= batch:
                yield _pack(codec, ids, vecs)
                ids, vecs = [], []
        if ids:
            yield _pack(codec, ids, vecs)

    # ------------------------------------------------------------------ bulk deletion and retention
    def get_vectors(self, gallery: str, ids: Iterable[int]) -> list[np.ndarray | None]:
        """The stored vectors of ``ids`` as float32 (None where absent), in one round trip."""
        codec, raw = self.get_raw_vectors(gallery, ids)
        return [None if v is None else codec.decode(v) for v in raw]

    def get_raw_vectors(self, gallery: str, ids: Iterable[int]) -> tuple[VectorCodec, list[bytes | None]]:
        """``(codec, the stored vectors of ids as they are kept)`` (None where absent), read together in one
        MULTI/EXEC: for callers that check each length against ``codec.nbytes(dim)`` and decode many at once
        (``codec.decode_many``)."""
        ids = [str(int(i)) for i in ids]
        pipe = self.r.pipeline(transaction=True)
        pipe.hget(self.k_gallery(gallery), "vector_dtype")
        if ids:
            pipe.hmget(self.k_vectors(gallery), ids)
        res = pipe.execute()
        codec = VectorCodec.named(_s(res[0]) or LEGACY_DTYPE)
        return codec, (list(res[1]) if ids else [])

    def iter_image_ids(self, gallery: str, batch: int = 1000) -> Iterator[list[int]]:
        """Batches of the gallery's image ids (HSCAN of its vectors; NOVALUES where Redis >= 7.4 has it)."""
        seen: set[int] = set()  # HSCAN may return a field twice while Redis rehashes
        chunk: list[int] = []
        for item in self._hscan_fields(self.k_vectors(gallery), batch):
            id_ = int(item)
            if id_ not in seen:
                seen.add(id_)
                chunk.append(id_)
            if len(chunk) >= batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _hscan_fields(self, key: str, batch: int) -> Iterator[bytes]:
        if self._novalues is not False:
            try:
                for field in self.r.hscan_iter(key, count=batch, no_values=True):
                    self._novalues = True
                    yield field
                return
            except redis.ResponseError:
                if self._novalues:
                    raise
                self._novalues = False  # an older Redis: scan with the values and drop them
        for field, _ in self.r.hscan_iter(key, count=batch):
            yield field

    def iter_image_meta(self, gallery: str, fields: Sequence[str], batch: int = 1000
                        ) -> Iterator[list[tuple[int, dict[str, str | None]]]]:
        """Batches of ``(id, {field: value})`` for every image of the gallery (absent fields are None)."""
        for ids in self.iter_image_ids(gallery, batch):
            pipe = self.r.pipeline(transaction=False)
            for i in ids:
                pipe.hmget(self.k_image(gallery, i), *fields)
            yield [(i, dict(zip(fields, map(_s, vals)))) for i, vals in zip(ids, pipe.execute())]

    def delete_many(self, gallery: str, ids: Sequence[int]) -> int:
        """Delete these images (vector, metadata, kept bytes) with their ``delete`` change-log entries in ONE
        MULTI/EXEC; the caller batches. Returns how many existed. Their blobs are removed after the transaction
        (the removal rule of the module docstring)."""
        ids = [int(i) for i in dict.fromkeys(int(i) for i in ids)]
        if not ids:
            return 0
        fields = [str(i) for i in ids]
        token = uuid.uuid4().hex
        removing: set[str] = set()

        def txn(pipe: redis.client.Pipeline) -> None:
            nonlocal removing
            # the blobs these images reference, read under the WATCH of their records (a reference changes only
            # with its record)
            removing = {raw.hex() for raw in self.r.hmget(self.k_blobs(gallery), fields) if raw is not None}
            pipe.multi()
            for f in fields:
                pipe.hdel(self.k_vectors(gallery), f)
            for i in ids:
                pipe.delete(self.k_image(gallery, i))
            pipe.hdel(self.k_images(gallery), *fields)
            pipe.hdel(self.k_blobs(gallery), *fields)
            for key in removing:
                pipe.set(self.k_blob_mark(gallery, key), token, px=BLOB_MARK_TTL_MS)
            for f in fields:
                self._event(pipe, "delete", gallery, f)

        res = self._transaction(txn, *(self.k_image(gallery, i) for i in ids))
        self._remove_blobs(gallery, removing, token)
        n = len(ids)
        return sum(1 for vec, meta in zip(res[:n], res[n:2 * n]) if vec or meta)

    def _remove_blobs(self, gallery: str, keys: Iterable[str], token: str) -> None:
        """Remove blobs whose references are gone and whose removal marks ``token`` set (in the same transaction).
        Best effort: a blob left behind (an error here, a crash) is an orphan for the sweep, never a problem."""
        keys = sorted(keys)
        if not keys:
            return
        marks = [self.k_blob_mark(gallery, k) for k in keys]
        try:
            blobs = self._blobs(gallery)
            trashed = []
            for key in keys:
                trash = blobs.move_to_trash(key, token)
                if trash is not None:
                    trashed.append((key, trash))
            if trashed:
                # Still our mark: no writer has referenced the blob since (it would have waited for the mark).
                # Not ours any more (it ran out while we were slow): a writer may have, so put the blob back.
                pipe = self.r.pipeline(transaction=False)
                for key, _ in trashed:
                    pipe.get(self.k_blob_mark(gallery, key))
                for (key, trash), mark in zip(trashed, pipe.execute()):
                    if mark == token.encode():
                        blobs.discard(trash)
                    else:
                        blobs.restore(trash, key)
        except (OSError, BlobError, redis.RedisError) as e:
            log.warning("gallery %s: could not remove %d blob(s) (left for the orphan sweep): %s",
                        gallery, len(keys), e)
        finally:
            try:
                self._release_marks(keys=marks, args=[token])
            except redis.RedisError:
                pass  # they expire by themselves

    def set_retention(self, gallery: str, days: int | None) -> bool:
        """Set (or clear, with None) the gallery's ``retention_days``. Returns False if it does not exist."""
        if not self.gallery_exists(gallery):
            return False
        missing = False

        def txn(pipe: redis.client.Pipeline) -> None:
            nonlocal missing
            # its settings hash, in its own slot, says whether it still exists: a delete removes it
            missing = not pipe.hexists(self.k_gallery(gallery), "name")
            if missing:
                return
            pipe.multi()
            if days is None:
                pipe.hdel(self.k_gallery(gallery), "retention_days")
            else:
                pipe.hset(self.k_gallery(gallery), "retention_days", str(int(days)))

        # WATCH it: a delete of the gallery in between aborts and re-checks (no orphan settings hash)
        self._transaction(txn, self.k_gallery(gallery))
        return not missing

    def galleries_with_retention(self) -> dict[str, int]:
        """Gallery -> its ``retention_days``, for the galleries that have one."""
        names = self.list_galleries()
        pipe = self.r.pipeline(transaction=False)
        for g in names:
            pipe.hget(self.k_gallery(g), "retention_days")
        return {g: int(d) for g, d in zip(names, pipe.execute()) if d is not None}

    # ------------------------------------------------------------------ image bytes
    def _blobs(self, gallery: str) -> BlobStore:
        """The gallery's blob folder (its own: a blob is never shared between galleries)."""
        if self.blob_dir is None:
            raise BlobError(f"gallery {gallery!r} keeps image bytes on disk, but this store has no blob directory "
                            "(REID_BLOB_DIR)")
        return BlobStore(self.blob_dir / validate_gallery_name(gallery))

    def check_blob_dir(self) -> str | None:
        """Whether ``blob_dir`` is the blob directory this Redis's images reference; a problem to report, or None.

        The first process that keeps bytes on disk gives its blob directory an identity and records it in Redis;
        every later one must find the same identity in its own blob directory. A replica whose REID_BLOB_DIR is its
        own folder rather than the shared one (or a volume that was replaced) is found here, at start, instead of
        by a thumbnail or an activation failing on another replica later."""
        if self.blob_dir is None:
            return None
        recorded, local = _s(self.r.get(self.k_blob_store())), read_identity(self.blob_dir)
        if recorded is None:
            if self.image_storage != "disk":
                return None  # no bytes on disk anywhere yet
            local = local or claim_identity(self.blob_dir, uuid.uuid4().hex)
            if self.r.set(self.k_blob_store(), local, nx=True):
                return None
            recorded = _s(self.r.get(self.k_blob_store()))
        if recorded == local:
            return None
        return (f"the blob directory {self.blob_dir} is not the one this Redis's kept image bytes are in (it has "
                f"identity {local or 'none'}, Redis records {recorded}): every API replica must use the same folder "
                "(REID_BLOB_DIR on a shared volume). If this folder really is the store now (the old one is lost), "
                f"DEL {self.k_blob_store()} in Redis lets it claim the store")

    def count_images(self, gallery: str) -> int:
        """Images of the gallery whose bytes are kept (on disk or, the older layout, in Redis)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hlen(self.k_blobs(gallery))
        pipe.hlen(self.k_images(gallery))
        return sum(int(n) for n in pipe.execute())

    def image_bytes_in_redis(self) -> dict[str, int]:
        """Gallery -> how many of its images keep their bytes inside Redis (the layout before the blob store), for
        the galleries that have such images (:meth:`migrate_image_bytes` moves them)."""
        names = self.list_galleries()
        pipe = self.r.pipeline(transaction=False)
        for g in names:
            pipe.hlen(self.k_images(g))
        return {g: int(n) for g, n in zip(names, pipe.execute()) if int(n)}

    def get_image_bytes(self, gallery: str, ids: Iterable[int]) -> list[bytes | None]:
        """The kept bytes of ``ids`` (None where none are kept or the image does not exist). Raises
        :class:`BlobError` if an image's blob is missing or damaged."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        fields = [str(i) for i in ids]
        pipe = self.r.pipeline(transaction=True)  # one moment: an image moving to disk is in exactly one place
        pipe.hmget(self.k_blobs(gallery), fields)
        pipe.hmget(self.k_images(gallery), fields)
        refs, in_redis = pipe.execute()
        return [self._read_blob(gallery, id_, ref.hex()) if ref is not None else data
                for id_, ref, data in zip(ids, refs, in_redis)]

    def _read_blob(self, gallery: str, id_: int, key: str) -> bytes | None:
        try:
            return self._blobs(gallery).get(key)
        except BlobMissing:
            # deleted since its reference was read (the delete removed the file)? Then it has no bytes now.
            if self.r.hget(self.k_blobs(gallery), str(id_)) != bytes.fromhex(key):
                return None
            raise

    def iter_images(self, gallery: str, batch: int = 64) -> Iterator[list[tuple[int, bytes, str | None]]]:
        """Yield batches of ``(id, image bytes, camera_id)`` of the images whose bytes are kept (HSCAN of the
        bytes still in Redis, then of the references to blobs on disk)."""
        seen: set[int] = set()  # HSCAN may return an entry twice while Redis rehashes; a migration moves entries
        for key, on_disk in ((self.k_images(gallery), False), (self.k_blobs(gallery), True)):
            chunk: list[tuple[int, bytes]] = []
            for field, value in self.r.hscan_iter(key, count=batch):
                id_ = int(field)
                if id_ in seen:
                    continue
                seen.add(id_)
                chunk.append((id_, value))
                if len(chunk) >= batch:
                    yield self._kept_batch(gallery, chunk, on_disk)
                    chunk = []
            if chunk:
                yield self._kept_batch(gallery, chunk, on_disk)

    def _kept_batch(self, gallery: str, chunk: list[tuple[int, bytes]], on_disk: bool
                    ) -> list[tuple[int, bytes, str | None]]:
        pipe = self.r.pipeline(transaction=False)
        for id_, _ in chunk:
            pipe.exists(self.k_image(gallery, id_))
            pipe.hget(self.k_image(gallery, id_), "camera_id")
        res = pipe.execute()
        out = []
        # an image deleted since the scan has no record any more: leave it out
        for (id_, value), present, camera in zip(chunk, res[::2], res[1::2]):
            if not present:
                continue
            data = self._read_blob(gallery, id_, value.hex()) if on_disk else value
            if data is not None:
                out.append((id_, data, _s(camera)))
        return out

    def referenced_blobs(self, gallery: str, batch: int = 1000) -> set[str]:
        """The keys of the blobs the gallery's records reference (a snapshot; HSCAN)."""
        return {raw.hex() for _, raw in self.r.hscan_iter(self.k_blobs(gallery), count=batch)}

    def is_blob_referenced(self, gallery: str, id_: int, key: str) -> bool:
        """Whether image ``id_`` of the gallery (the only one that may: see the module docstring) references the
        blob ``key``."""
        return self.r.hget(self.k_blobs(gallery), str(int(id_))) == bytes.fromhex(key)

    def remove_unreferenced_blob(self, gallery: str, id_: int, key: str) -> bool:
        """Remove the blob ``key`` (whose bytes have the content id ``id_`` in this gallery) if no record references
        it, by the removal rule of the module docstring. Returns whether it was removed (False: referenced, or
        another remover holds it)."""
        token = uuid.uuid4().hex
        claimed = self._claim_unreferenced(
            keys=[self.k_blobs(gallery), self.k_blob_mark(gallery, key)],
            args=[str(int(id_)), bytes.fromhex(key), token, BLOB_MARK_TTL_MS])
        if not claimed:
            return False
        self._remove_blobs(gallery, [key], token)
        return not self._blobs(gallery).exists(key)

    def migrate_image_bytes(self, gallery: str, batch: int = 64) -> MigrationResult:
        """Move the gallery's kept bytes from Redis (the layout before the blob store) to its blob folder, a batch
        of images per transaction: each blob is written and fsynced, then its reference set and the bytes dropped
        from Redis in one MULTI/EXEC. Safe to run while the service serves, and again after a crash."""
        moved = dropped = skipped = 0
        chunk: list[tuple[int, bytes]] = []

        def flush() -> None:
            nonlocal moved, dropped, skipped
            m, d, s = self._migrate_batch(gallery, chunk)
            moved, dropped, skipped = moved + m, dropped + d, skipped + s

        for field, data in self.r.hscan_iter(self.k_images(gallery), count=batch):
            chunk.append((int(field), data))
            if len(chunk) >= batch:
                flush()
                chunk = []
        if chunk:
            flush()
        return MigrationResult(moved, dropped, skipped)

    def _migrate_batch(self, gallery: str, chunk: list[tuple[int, bytes]]) -> tuple[int, int, int]:
        # A blob is one image's only under its content id; bytes kept under another id stay in Redis.
        eligible = {id_: data for id_, data in chunk if image_id(gallery, data) == id_}
        if not eligible:
            return 0, 0, len(chunk)
        ids = sorted(eligible)
        keys = {id_: blob_key(eligible[id_]) for id_ in ids}
        marks = sorted({self.k_blob_mark(gallery, k) for k in keys.values()})
        result = (0, 0, 0)

        def txn(pipe: redis.client.Pipeline) -> None:
            nonlocal result
            existed, _, busy, _ = self._write_state(gallery, ids, marks)
            if busy:
                raise _BlobBusy(busy)
            present = [i for i, ex in zip(ids, existed) if ex]
            blobs = self._blobs(gallery)
            for i in present:
                blobs.put(eligible[i])  # durable before its reference, as put_many does
            pipe.multi()
            if present:
                pipe.hset(self.k_blobs(gallery), mapping={str(i): bytes.fromhex(keys[i]) for i in present})
            pipe.hdel(self.k_images(gallery), *(str(i) for i in ids))
            result = (len(present), len(ids) - len(present), len(chunk) - len(ids))

        self._transaction_waiting_for_blobs(txn, *(self.k_image(gallery, i) for i in ids), *marks)
        return result

    # ------------------------------------------------------------------ re-embedding (model activation)
    def active_bundle(self) -> str | None:
        return _s(self.r.get(self.k_active_bundle()))

    def vector_ids(self, gallery: str) -> set[int]:
        return {int(x) for x in self.r.hkeys(self.k_vectors(gallery))}

    def staged_ids(self, gallery: str) -> set[int]:
        return {int(x) for x in self.r.hkeys(self.k_staged(gallery))}

    def clear_staged(self, gallery: str) -> None:
        self.r.delete(self.k_staged(gallery))

    def stage_vectors(self, gallery: str, ids, vectors: np.ndarray) -> None:
        """Stage vectors in this store's dtype (``commit_staged`` records it as the gallery's: an activation is
        how an existing gallery changes dtype)."""
        if len(ids):
            rows = self.codec.encode_rows(np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1))
            self.r.hset(self.k_staged(gallery), mapping={str(int(i)): v for i, v in zip(ids, rows)})

    def unstage(self, gallery: str, ids) -> None:
        ids = [str(int(i)) for i in ids]
        if ids:
            self.r.hdel(self.k_staged(gallery), *ids)

    def commit_staged(self, galleries: Mapping[str, int], model: str, bundle_id: str,
                      watch: Sequence[str] = (), precondition: Callable[[Any], None] | None = None) -> None:
        """Replace every gallery's vectors by its staged ones (and its vector_dtype by this store's, in which
        :meth:`stage_vectors` wrote them) and record ``bundle_id`` as active, in ONE transaction. ``galleries`` maps
        each gallery to its new vector dimension.

        Raises :class:`StagingStale` (nothing written) unless the galleries are exactly the store's and
        each one's staged ids are exactly its images. ``precondition(pipe)`` may read the ``watch`` keys
        and raise to abort; a change to any of them before EXEC makes the check run again.

        One transaction over every gallery's slot: Redis Cluster cannot run it (:class:`ClusterUnsupported`).
        """
        if self.cluster:
            raise ClusterUnsupported("activating another model on Redis Cluster is not supported yet: its switch is "
                                     "one transaction over every gallery, and a cluster spreads them over nodes")
        names = sorted(galleries)
        keys = [self.k_galleries(), *watch, *(self.k_vectors(g) for g in names), *(self.k_staged(g) for g in names),
                *(self.k_gallery(g) for g in names)]

        def txn(pipe: redis.client.Pipeline) -> None:
            current = sorted(_s(x) for x in pipe.smembers(self.k_galleries()))
            if current != names:
                raise StagingStale(f"galleries changed: staged {names}, store has {current}")
            ids: dict[str, list[bytes]] = {}
            for g in names:
                ids[g] = pipe.hkeys(self.k_staged(g))
                if set(ids[g]) != set(pipe.hkeys(self.k_vectors(g))):
                    raise StagingStale(f"gallery {g}: images changed since they were staged")
            if precondition is not None:
                precondition(pipe)
            pipe.multi()
            for g in names:
                if ids[g]:
                    pipe.rename(self.k_staged(g), self.k_vectors(g))
                pipe.hset(self.k_gallery(g), "vector_dtype", self.codec.name)
                for i in ids[g]:
                    pipe.hset(self.k_image(g, int(i)), mapping={"model": model, "dim": str(galleries[g])})
            pipe.set(self.k_active_bundle(), bundle_id)
            self._global_event(pipe, "activate", "", bundle_id)  # replicas switch models too (service.follower)

        self._transaction(txn, *keys)


def _gallery_info(gallery: str, count: Any, fields: Sequence[Any]) -> dict[str, Any]:
    created, days = fields
    return {"name": gallery, "count": int(count), "created_at": _s(created),
            "retention_days": int(days) if days is not None else None}


def _pack(codec: VectorCodec, ids: list[int], vecs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(ids, dtype=np.int64), codec.decode_many(vecs, codec.dim_of(vecs[0]))

