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

from .durability import WaitAofPipeline

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

    # ------------------------------------------------------------------ basics
    def ping(self) -> bool:
        return bool(self.r.ping())

    def close(self) -> None:
        try:
            self.r.close()
        except Exception:  # pragma: no cover - best effort
            pass

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

    def gallery_info(self, gallery: str) -> dict[str, Any] | None:
        """``{"name", "count", "created_at", "retention_days"}`` or None if the gallery does not exist."""
        if not self.gallery_exists(gallery):
            return None
        pipe = self.r.pipeline(transaction=True)
        pipe.hlen(self.k_vectors(gallery))
        pipe.hmget(self.k_gallery(gallery), "created_at", "retention_days")
        n, (created, days) = pipe.execute()
        return {"name": gallery, "count": int(n), "created_at": _s(created),
                "retention_days": int(days) if days is not None else None}

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
            check = self.r.pipeline(transaction=False)
            for k in keys:
                check.exists(k)
            existed = [bool(x) for x in check.execute()]
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
        ids = [str(int(i)) for i in ids]
        raw = self.r.hmget(self.k_vectors(gallery), ids) if ids else []
        return [None if v is None else np.frombuffer(v, dtype="<f4").astype(np.float32) for v in raw]

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


def _pack(ids: list[int], vecs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    d = len(vecs[0]) // 4
    arr = np.frombuffer(b"".join(vecs), dtype="<f4").reshape(len(vecs), d).astype(np.float32)
    return np.asarray(ids, dtype=np.int64), arr

