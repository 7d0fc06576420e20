"""Redis store: the source of truth for galleries, image metadata and vectors.

The FAISS index (:mod:`index.vector_index`) is only a cache of what is written here.

Key layout (all keys prefixed ``reid:``; gallery names match :data:`GALLERY_NAME_RE`,
so they never contain ``:``)::

    reid:galleries                      SET    names of all galleries
    reid:gallery:{g}                    HASH   name, created_at (ISO 8601 UTC), retention_days (optional)
    reid:gallery:{g}:vectors            HASH   {image id (decimal)} -> float32 vector bytes (little endian)
    reid:gallery:{g}:image:{id}         HASH   id, gallery, external_id, camera_id, person_id,
                                               captured_at, filename, created_at, model, dim
    reid:gallery:{g}:images             HASH   {image id} -> the original image bytes as uploaded
                                               (kept to adapt a model and to re-embed; optional)
    reid:gallery:{g}:vectors:staged     HASH   like :vectors, written by a model activation before it
                                               replaces :vectors in one transaction
    reid:active_bundle                  STRING id of the model bundle whose vectors the store holds
    reid:events                         STREAM change log (op=put|delete|drop|activate, gallery, id),
                                               capped at ~``events_maxlen`` entries (approximate
                                               trimming), for replicas to follow (index.events)
    reid:{name}:lock                    STRING a lease that one replica holds for a periodic chore
                                               (:meth:`RedisStore.hold_lease`; ``retention`` sweeps)
    reid:job:{id}, reid:jobs:lock:{kind}       background jobs' records and locks (index.job_store)

Nothing outside this package reads or writes these keys itself: it calls the methods here.

Image ids are stable: the first 8 bytes of ``sha256(gallery + b"\\0" + image bytes)`` read
big-endian with the top bit cleared (a positive signed 63-bit integer). Re-uploading the
same bytes to the same gallery gives the same id.

Writes of images (vector + metadata + image bytes + gallery membership + change event) happen in one
MULTI/EXEC transaction guarded by WATCH on the image keys (:meth:`RedisStore.put_many`), so
a reader never sees half an image and two concurrent uploads of the same bytes report
exactly one ``created``.

Durability: with ``wait_aof_ms`` set (a server running ``appendfsync everysec``/``no`` that has
WAITAOF, see :mod:`index.durability`), every write transaction is followed by ``WAITAOF 1 0`` on its
connection, so it returns only once the change is fsynced to the AOF.

Metadata values are stored and returned as strings (``camera_id`` "1" stays "1"); fields
that were not given are absent (returned as ``None``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .durability import Persistence, WaitAofPipeline, probe
from .events import Event, EventReader, StreamInfo, read_range, stream_info
from .job_store import JobStore

__all__ = [
    "GALLERY_NAME_RE",
    "METADATA_FIELDS",
    "InvalidGalleryName",
    "RedisStore",
    "StagingStale",
    "StoredImage",
    "image_id",
    "validate_gallery_name",
]

PREFIX = "reid:"
GALLERY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: user-supplied metadata fields (strings)
METADATA_FIELDS = ("external_id", "camera_id", "person_id", "captured_at", "filename")
EVENTS_MAXLEN = 100_000
#: fields of a gallery's settings hash that the store manages itself (others: :meth:`RedisStore.set_gallery_field`)
GALLERY_OWN_FIELDS = ("name", "created_at", "retention_days")

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


class InvalidGalleryName(ValueError):
    pass


class StagingStale(RuntimeError):
    """The staged vectors no longer cover exactly the gallery's images (a write happened meanwhile)."""


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

    ``client`` may be a ``redis.Redis`` or a URL (``redis://host:port/db``,
    ``unix:///path/to/sock``).
    """

    def __init__(self, client: redis.Redis | str, socket_timeout: float = 5.0, events_maxlen: int = EVENTS_MAXLEN,
                 wait_aof_ms: int | None = None):
        if isinstance(client, str):
            client = redis.Redis.from_url(
                client,
                decode_responses=False,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                health_check_interval=30,
                # Fail fast (then 503 + Retry-After upstream) instead of redis-py's multi-second default.
                retry=Retry(ExponentialBackoff(cap=0.25, base=0.02), retries=2),
            )
        self.r: redis.Redis = client
        self._novalues: bool | None = None  # whether HSCAN ... NOVALUES works (Redis >= 7.4); None: untried
        self.events_maxlen = int(events_maxlen)
        #: WAITAOF timeout after each write transaction; None: the server's own fsync policy is enough
        self.wait_aof_ms = wait_aof_ms
        self._patch = client.register_script(_PATCH)

    def _pipeline(self) -> redis.client.Pipeline:
        """A MULTI/EXEC pipeline for a change: followed by WAITAOF when ``wait_aof_ms`` is set."""
        if self.wait_aof_ms is not None:
            return WaitAofPipeline(self.r, self.wait_aof_ms)
        return self.r.pipeline(transaction=True)

    def _transaction(self, func: Callable[[redis.client.Pipeline], None], *watches: str) -> list:
        """``redis.Redis.transaction`` through :meth:`_pipeline` (WATCH, func, EXEC; again on WatchError)."""
        with self._pipeline() as pipe:
            while True:
                try:
                    if watches:
                        pipe.watch(*watches)
                    func(pipe)
                    return pipe.execute()
                except redis.WatchError:
                    continue

    def _event(self, pipe: redis.client.Pipeline, op: str, gallery: str, ref: str) -> None:
        pipe.xadd(self.k_events(), {"op": op, "gallery": gallery, "id": ref},
                  maxlen=self.events_maxlen, approximate=True)

    def last_event_id(self) -> str:
        """Id of the newest change-log entry ("0-0" if none)."""
        last = self.r.xrevrange(self.k_events(), count=1)
        return last[0][0].decode() if last else "0-0"

    def change_log_info(self) -> StreamInfo:
        return stream_info(self.r, self.k_events())

    def read_events(self, after: str, until: str) -> Iterator[list[Event]]:
        """Batches of the change-log entries with ``after < id <= until``."""
        return read_range(self.r, self.k_events(), after, until)

    def event_reader(self, block_ms: int) -> EventReader:
        """A reader of new change-log entries on a connection of its own: a blocking XREAD holds its connection, so it
        must not share the request pool, nor its socket timeout (shorter than ``block_ms`` may be)."""
        pool = self.r.connection_pool
        client = redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class,
            **{**pool.connection_kwargs, "socket_timeout": block_ms / 1000 + 5.0}))
        return EventReader(client, self.k_events(), block_ms)

    # ------------------------------------------------------------------ keys
    @staticmethod
    def k_galleries() -> str:
        return PREFIX + "galleries"

    @staticmethod
    def k_gallery(g: str) -> str:
        return f"{PREFIX}gallery:{g}"

    @staticmethod
    def k_vectors(g: str) -> str:
        return f"{PREFIX}gallery:{g}:vectors"

    @staticmethod
    def k_image(g: str, id_: int) -> str:
        return f"{PREFIX}gallery:{g}:image:{int(id_)}"

    @staticmethod
    def k_images(g: str) -> str:
        return f"{PREFIX}gallery:{g}:images"

    @staticmethod
    def k_staged(g: str) -> str:
        return f"{PREFIX}gallery:{g}:vectors:staged"

    @staticmethod
    def k_events() -> str:
        return PREFIX + "events"

    @staticmethod
    def k_active_bundle() -> str:
        return PREFIX + "active_bundle"

    @staticmethod
    def k_lease(name: str) -> str:
        return f"{PREFIX}{name}:lock"

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
        created = False

        def txn(pipe: redis.client.Pipeline) -> None:
            nonlocal created
            created = not pipe.sismember(self.k_galleries(), gallery)
            pipe.multi()
            pipe.sadd(self.k_galleries(), gallery)
            pipe.hsetnx(self.k_gallery(gallery), "name", gallery)
            pipe.hsetnx(self.k_gallery(gallery), "created_at", _now())
            if created and retention_days is not None:
                pipe.hset(self.k_gallery(gallery), "retention_days", str(int(retention_days)))

        self._transaction(txn, self.k_galleries())
        return created

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

    def counts_at_log_position(self) -> tuple[dict[str, int], set[str], str | None]:
        """``(counts, galleries, last)`` read in ONE MULTI/EXEC, so that the counts are exactly those that the change
        log reflects up to its newest entry ``last`` (None while it is empty). ``counts`` covers the galleries listed
        just before; ``galleries`` is the set inside the transaction."""
        names = self.list_galleries()
        pipe = self.r.pipeline(transaction=True)
        for g in names:
            pipe.hlen(self.k_vectors(g))
        pipe.smembers(self.k_galleries())
        pipe.xrevrange(self.k_events(), count=1)
        *counts, members, last = pipe.execute()
        return ({g: int(n) for g, n in zip(names, counts)}, {_s(m) for m in members},
                last[0][0].decode() if last else None)

    def images_without_bytes(self) -> dict[str, int]:
        """Gallery -> how many of its images have no kept bytes, for the galleries that have such images."""
        names = self.list_galleries()
        pipe = self.r.pipeline(transaction=False)
        for g in names:
            pipe.hlen(self.k_vectors(g))
            pipe.hlen(self.k_images(g))
        res = pipe.execute()
        missing = {g: int(n) - int(kept) for g, n, kept in zip(names, res[::2], res[1::2])}
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
        # Drop it from the listing first so nobody finds a half-deleted gallery.
        pipe = self._pipeline()
        pipe.srem(self.k_galleries(), gallery)
        self._event(pipe, "drop", gallery, "")
        pipe.execute()
        keys: list[str] = []
        for field, _ in self.r.hscan_iter(self.k_vectors(gallery), count=batch):
            keys.append(self.k_image(gallery, int(field)))
            if len(keys) >= batch:
                self.r.delete(*keys)
                keys.clear()
        if keys:
            self.r.delete(*keys)
        self.r.delete(self.k_vectors(gallery), self.k_images(gallery), self.k_staged(gallery),
                      self.k_gallery(gallery))
        return True

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

        ``images``, aligned with ``records``, are the original bytes to keep (None: keep none).
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
        blobs = list(images) if images is not None else [None] * len(records)
        now = _now()
        prepared = []
        for id_, vector, metadata in records:
            vec = np.ascontiguousarray(np.asarray(vector, dtype="<f4").reshape(-1))
            meta = {k: _s(v) for k, v in (metadata or {}).items() if k in METADATA_FIELDS and v is not None}
            meta.update({"id": str(int(id_)), "gallery": gallery, "created_at": now, "dim": str(vec.shape[0])})
            if model:
                meta["model"] = model
            prepared.append((int(id_), self.k_image(gallery, id_), vec.tobytes(), meta))
        keys = [k for _, k, _, _ in prepared]
        existed: list[bool] = []

        def txn(pipe: redis.client.Pipeline) -> None:
            nonlocal existed
            # Keys are WATCHed on `pipe`'s connection; read their state in one round trip on
            # another connection (any change after WATCH still aborts EXEC).
            existed = self.exists_many(gallery, [id_ for id_, _, _, _ in prepared])
            pipe.multi()
            written: set[int] = set()
            vectors: dict[str, bytes] = {}  # one HSET each for the batch's vectors and kept images
            kept: dict[str, bytes] = {}
            for (id_, key, vbytes, meta), ex, blob in zip(prepared, existed, blobs):
                if ex or id_ in written:
                    continue
                written.add(id_)
                vectors[str(id_)] = vbytes
                pipe.hset(key, mapping=meta)
                if blob is not None:
                    kept[str(id_)] = bytes(blob)
                self._event(pipe, "put", gallery, str(id_))
            if vectors:
                pipe.hset(self.k_vectors(gallery), mapping=vectors)
            if kept:
                pipe.hset(self.k_images(gallery), mapping=kept)
            if written:
                pipe.sadd(self.k_galleries(), gallery)
                pipe.hsetnx(self.k_gallery(gallery), "name", gallery)
                pipe.hsetnx(self.k_gallery(gallery), "created_at", now)

        self._transaction(txn, *keys)
        # a duplicate id inside the batch: the second occurrence "exists"
        seen: set[int] = set()
        out = []
        for (id_, _, _, _), ex in zip(prepared, existed):
            out.append(ex or id_ in seen)
            seen.add(id_)
        return out

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
        raw = self.r.hget(self.k_vectors(gallery), str(int(id_)))
        return None if raw is None else np.frombuffer(raw, dtype="<f4").astype(np.float32)

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
        """Delete one image. Returns False if it did not exist."""
        pipe = self._pipeline()
        pipe.hdel(self.k_vectors(gallery), str(int(id_)))
        pipe.delete(self.k_image(gallery, id_))
        pipe.hdel(self.k_images(gallery), str(int(id_)))
        self._event(pipe, "delete", gallery, str(int(id_)))
        n_vec, n_meta, _, _ = pipe.execute()
        return bool(n_vec or n_meta)

    def iter_vectors(self, gallery: str, batch: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(ids int64 (n,), vectors float32 (n, d))`` batches, via HSCAN (never KEYS).

        Vectors of differing dimension within a batch are split into separate batches.
        """
        ids: list[int] = []
        vecs: list[bytes] = []
        for field, value in self.r.hscan_iter(self.k_vectors(gallery), count=batch):
            if vecs and len(value) != len(vecs[0]):
                yield _pack(ids, vecs)
                ids, vecs = [], []
            ids.append(int(field))
            vecs.append(value)
            if len(ids) >= batch:
                yield _pack(ids, vecs)
                ids, vecs = [], []
        if ids:
            yield _pack(ids, vecs)

    # ------------------------------------------------------------------ bulk deletion and retention
    def get_vectors(self, gallery: str, ids: Iterable[int]) -> list[np.ndarray | None]:
        """The stored vectors of ``ids`` (None where absent), in one HMGET."""
        return [None if v is None else np.frombuffer(v, dtype="<f4").astype(np.float32)
                for v in self.get_raw_vectors(gallery, ids)]

    def get_raw_vectors(self, gallery: str, ids: Iterable[int]) -> list[bytes | None]:
        """The stored vectors of ``ids`` as they are kept (float32 little endian; None where absent), in one HMGET:
        for callers that check each length against a dimension and decode many at once."""
        ids = [str(int(i)) for i in ids]
        return self.r.hmget(self.k_vectors(gallery), ids) if ids else []

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
        MULTI/EXEC; the caller batches. Returns how many existed."""
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        pipe = self._pipeline()
        for i in ids:
            pipe.hdel(self.k_vectors(gallery), str(i))
        for i in ids:
            pipe.delete(self.k_image(gallery, i))
        pipe.hdel(self.k_images(gallery), *[str(i) for i in ids])
        for i in ids:
            self._event(pipe, "delete", gallery, str(i))
        res = pipe.execute()
        n = len(ids)
        return sum(1 for vec, meta in zip(res[:n], res[n:2 * n]) if vec or meta)

    def set_retention(self, gallery: str, days: int | None) -> bool:
        """Set (or clear, with None) the gallery's ``retention_days``. Returns False if it does not exist."""
        missing = False

        def txn(pipe: redis.client.Pipeline) -> None:
            nonlocal missing
            missing = not pipe.sismember(self.k_galleries(), gallery)
            if missing:
                return
            pipe.multi()
            if days is None:
                pipe.hdel(self.k_gallery(gallery), "retention_days")
            else:
                pipe.hset(self.k_gallery(gallery), "retention_days", str(int(days)))

        # WATCH both: a delete of the gallery in between aborts and re-checks (no orphan settings hash)
        self._transaction(txn, self.k_galleries(), self.k_gallery(gallery))
        return not missing

    def galleries_with_retention(self) -> dict[str, int]:
        """Gallery -> its ``retention_days``, for the galleries that have one."""
        names = self.list_galleries()
        pipe = self.r.pipeline(transaction=False)
        for g in names:
            pipe.hget(self.k_gallery(g), "retention_days")
        return {g: int(d) for g, d in zip(names, pipe.execute()) if d is not None}

    # ------------------------------------------------------------------ image bytes
    def count_images(self, gallery: str) -> int:
        """Images of the gallery whose bytes are kept."""
        return int(self.r.hlen(self.k_images(gallery)))

    def get_image_bytes(self, gallery: str, ids: Iterable[int]) -> list[bytes | None]:
        ids = [str(int(i)) for i in ids]
        return list(self.r.hmget(self.k_images(gallery), ids)) if ids else []

    def iter_images(self, gallery: str, batch: int = 64) -> Iterator[list[tuple[int, bytes, str | None]]]:
        """Yield batches of ``(id, image bytes, camera_id)`` of the images whose bytes are kept (HSCAN)."""
        seen: set[int] = set()  # HSCAN may return an entry twice while Redis rehashes
        chunk: list[tuple[int, bytes]] = []
        for field, data in self.r.hscan_iter(self.k_images(gallery), count=batch):
            id_ = int(field)
            if id_ in seen:
                continue
            seen.add(id_)
            chunk.append((id_, data))
            if len(chunk) >= batch:
                yield self._with_cameras(gallery, chunk)
                chunk = []
        if chunk:
            yield self._with_cameras(gallery, chunk)

    def _with_cameras(self, gallery: str, chunk: list[tuple[int, bytes]]) -> list[tuple[int, bytes, str | None]]:
        pipe = self.r.pipeline(transaction=False)
        for id_, _ in chunk:
            pipe.hmget(self.k_image(gallery, id_), "id", "camera_id")
        # an image deleted since the scan has no metadata any more: leave it out
        return [(id_, data, _s(camera)) for (id_, data), (present, camera) in zip(chunk, pipe.execute())
                if present is not None]

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
        vecs = np.ascontiguousarray(np.asarray(vectors, dtype="<f4"))
        if len(ids):
            self.r.hset(self.k_staged(gallery), mapping={str(int(i)): v.tobytes() for i, v in zip(ids, vecs)})

    def unstage(self, gallery: str, ids) -> None:
        ids = [str(int(i)) for i in ids]
        if ids:
            self.r.hdel(self.k_staged(gallery), *ids)

    def commit_staged(self, galleries: Mapping[str, int], model: str, bundle_id: str,
                      watch: Sequence[str] = (), precondition: Callable[[Any], None] | None = None) -> None:
        """Replace every gallery's vectors by its staged ones and record ``bundle_id`` as active, in ONE
        transaction. ``galleries`` maps each gallery to its new vector dimension.

        Raises :class:`StagingStale` (nothing written) unless the galleries are exactly the store's and
        each one's staged ids are exactly its images. ``precondition(pipe)`` may read the ``watch`` keys
        and raise to abort; a change to any of them before EXEC makes the check run again.
        """
        names = sorted(galleries)
        keys = [self.k_galleries(), *watch, *(self.k_vectors(g) for g in names), *(self.k_staged(g) for g in names)]

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
                for i in ids[g]:
                    pipe.hset(self.k_image(g, int(i)), mapping={"model": model, "dim": str(galleries[g])})
            pipe.set(self.k_active_bundle(), bundle_id)
            self._event(pipe, "activate", "", bundle_id)  # replicas switch models too (service.follower)

        self._transaction(txn, *keys)


def _gallery_info(gallery: str, count: Any, fields: Sequence[Any]) -> dict[str, Any]:
    created, days = fields
    return {"name": gallery, "count": int(count), "created_at": _s(created),
            "retention_days": int(days) if days is not None else None}


def _pack(ids: list[int], vecs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    d = len(vecs[0]) // 4
    arr = np.frombuffer(b"".join(vecs), dtype="<f4").reshape(len(vecs), d).astype(np.float32)
    return np.asarray(ids, dtype=np.int64), arr

