"""Redis store: the source of truth for galleries, image metadata and vectors.

The FAISS index (:mod:`index.vector_index`) is only a cache of what is written here.

Key layout 4 (all keys prefixed ``reid:``; gallery names match :data:`GALLERY_NAME_RE`, so they never contain
``:`` or braces). Every key of a gallery carries the gallery's name as its Redis Cluster hash tag (``{g}``), so
all of them live in one hash slot, on one node, and each change to a gallery is one atomic step there (a Lua script
or a MULTI/EXEC); every key that is no gallery's carries the tag ``{global}``. The same layout serves one Redis server
and Redis Cluster (``cluster=True``); :func:`index.store_layout.migrate_layout` brings a store of layout 1, 2 or 3 to
it.

    reid:{global}:galleries             SET    names of all galleries
    reid:{global}:events                STREAM the global change log: op=create|drop|activate, gallery, id
    reid:{global}:layout                STRING "4"
    reid:gallery:{g}                    HASH   name, created_at (ISO 8601 UTC), retention_days (optional),
                                               vector_dtype (float32|float16: how the pages hold this gallery's
                                               vectors; absent = float32, the layout before it was recorded),
                                               model (the model bundle that embedded its vectors),
                                               vector_bytes, page_slots, next_slot (its vector pages' geometry)
    reid:gallery:{g}:records            HASH   {image id (8 bytes, big endian)} -> the image's slot and record
                                               (created_at, external_id, camera_id, person_id, captured_at,
                                               filename) in ONE value (:mod:`index.image_record`: a field costs
                                               less than a key)
    reid:gallery:{g}:page:{n}           STRING the vectors of slots n*P .. n*P+P-1 side by side, little endian, in
                                               the gallery's vector_dtype; P = page_slots (:mod:`index.vector_pages`:
                                               no vector pays an allocator's rounding)
    reid:gallery:{g}:free-slots         LIST   slots freed by deletes, taken again before new ones
    reid:gallery:{g}:page-used          HASH   {page number} -> images in it (a page is freed when none is left)
    reid:gallery:{g}:blobs              HASH   {image id} -> sha256 (32 raw bytes) of the image's kept bytes,
                                               a blob in ``{blob_dir}/{g}/`` (:mod:`index.blob_store`)
    reid:gallery:{g}:images             HASH   {image id} -> the original image bytes inside Redis: the layout
                                               before the blob store, still written with image_storage="redis"
                                               and always read as a fallback (:meth:`RedisStore.migrate_image_bytes`
                                               moves them to disk)
    reid:gallery:{g}:blob-removing:{sha256 hex}
                                        STRING the token of a remover while it removes that blob's file
                                               (expires after :data:`BLOB_MARK_TTL_MS`)
    reid:gallery:{g}:blob-removals      STRING how many times a removal mark was set in the gallery (a writer
                                               of blobs compares it before and after writing them)
    reid:gallery:{g}:vectors:staged     HASH   {image id (8 bytes)} -> a vector, written by a model activation
                                               before it replaces the gallery's vectors in one step
    reid:gallery:{g}:events             STREAM the gallery's change log (op=put|delete, id), written in the same
                                               step as each change, capped at ~``events_maxlen`` entries
                                               (approximate trimming), for replicas to follow (index.events)
    reid:{global}:blob_store            STRING identity of the blob directory the kept bytes are in (the same
                                               is written in it, :func:`index.blob_store.claim_identity`)
    reid:{global}:active_bundle         STRING id of the model bundle whose vectors the store holds
    reid:{global}:activation            STRING the bundle an activation on Redis Cluster is switching galleries to
                                               (gallery by gallery there); gone when it is active
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

Writes of images (record + vector + kept-bytes reference + change event) happen in one Lua script per batch
(:meth:`RedisStore.put_many`), which writes an image only if it has no record, so a reader never sees
half an image and two concurrent uploads of the same bytes report exactly one ``created``; deletes likewise
(:meth:`RedisStore.delete_many`). No WATCH: writers of different images of one gallery never make each other retry.

Kept image bytes on disk (``image_storage="disk"``). Each gallery has its own content-addressed blob folder
``{blob_dir}/{g}/``, so a blob is referenced by at most one record: the image of that gallery whose id is
``image_id(g, bytes)`` (put_many refuses kept bytes under any other id). Two galleries holding the same bytes
hold two blobs, and removing one never touches the other. The rules:

* Write: the blob is written and fsynced (:meth:`BlobStore.put`) before the script that records its reference
  runs. A crash or a refused script in between leaves at worst an orphan blob, never a record pointing to a
  missing one; :func:`index.blob_gc.sweep_orphan_blobs` removes orphans.
* Remove (delete, retention, gallery deletion, the sweep): the reference is dropped and a removal mark
  ``…:blob-removing:{sha256}`` set in ONE transaction; then the file is renamed to a trash name, the mark read
  back, and the trash unlinked only if the mark is still this remover's (else put back: the mark ran out and a
  writer may have referenced the blob again); then the mark is released.
* Every step that sets removal marks also counts them (``…:blob-removals``). A writer reads the count (and that
  none of its blobs' marks is set) before it writes its blobs; its script refuses the whole batch if a mark is set
  or the count moved since (the writer waits for marks to go, then writes the blobs again and retries). A remover
  unlinks only while its mark is set, so a writer never records a reference to a blob that a remover took, even
  when the same image is uploaded, deleted and uploaded again at the same moment.

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
from contextlib import contextmanager
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
from . import vector_pages
from .image_record import METADATA_FIELDS, field_id, field_position, id_field, iso_from_ms, pack_record, \
    record_metadata, record_slot
from .job_store import JobStore
from .vector_codec import VectorCodec

__all__ = [
    "BLOB_MARK_TTL_MS",
    "Compaction",
    "GALLERY_NAME_RE",
    "IMAGE_STORAGES",
    "METADATA_FIELDS",
    "GalleryModelMismatch",
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
LAYOUT = "4"
GALLERY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
EVENTS_MAXLEN = 100_000
#: fields of a gallery's settings hash that the store manages itself (others: :meth:`RedisStore.set_gallery_field`)
GALLERY_OWN_FIELDS = ("name", "created_at", "retention_days", "vector_dtype", "model", "deleting", "vector_bytes",
                      "page_slots", "next_slot")
#: where kept image bytes go: files in the blob directory, or (the layout before it) a hash inside Redis
IMAGE_STORAGES = ("disk", "redis")
#: a removal mark outlives any removal (a rename and an unlink); it expires so a crashed remover blocks nobody
BLOB_MARK_TTL_MS = 60_000
#: a gallery's vectors without a vector_dtype record were written as float32 (the only layout before it)
LEGACY_DTYPE = "float32"

# Write a batch of images of one gallery, each only if it has no record, with its vector (in a slot of the gallery's
# pages, index.vector_pages), its kept-bytes reference (or bytes) and its change-log entry. Refused as a whole (nothing
# written) while the gallery is not set up for writes, its vector dtype is not the one the vectors were encoded in,
# its vectors are of another size, or a blob it references is being removed or may have been since the caller read
# the gallery's count of blob removals (before it wrote the blobs).
# The gallery's model is recorded by its first write (later ones leave it: only an activation, which re-embeds
# every image, changes it), so a gallery written under another model than the service's stays visible as such;
# a write of another model's vectors is refused (one gallery never mixes two models' features: a replica that has
# not yet followed an activation, or a service upgraded to a new bundle before re-embedding).
# KEYS: settings, records, blobs, images, events, blob removals, removal marks...
# ARGV: dtype, events maxlen, model ('' none), blob removals as read ('' no blobs), vector bytes, then per image: id
# field, id (decimal), record, vector, blob reference ('' none), bytes ('' none)
_PUT = vector_pages.LUA + """
local s = KEYS[1]
if redis.call('HEXISTS', s, 'deleting') == 1 then return {'leftovers'} end
if redis.call('HEXISTS', s, 'name') == 0 then return {'unlisted'} end
local dtype = redis.call('HGET', s, 'vector_dtype')
if not dtype then
  if redis.call('HLEN', KEYS[2]) == 0 then dtype = ARGV[1]; redis.call('HSET', s, 'vector_dtype', dtype)
  else dtype = 'float32' end
end
if dtype ~= ARGV[1] then return {'dtype', dtype} end
local vb = redis.call('HGET', s, 'vector_bytes')
if vb and vb ~= ARGV[5] and redis.call('HLEN', KEYS[2]) > 0 then return {'size', vb} end
local model = redis.call('HGET', s, 'model')
if model and ARGV[3] ~= '' and model ~= ARGV[3] then return {'model', model} end
if ARGV[4] ~= '' and (redis.call('GET', KEYS[6]) or '0') ~= ARGV[4] then return {'busy', KEYS[6]} end
for i = 7, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then return {'busy', KEYS[i]} end
end
if vb ~= ARGV[5] then  -- the first write, or one of another size into a gallery emptied since
  if vb then drop_pages(s) end
  vb = ARGV[5]
  redis.call('HSET', s, 'vector_bytes', vb, 'page_slots', page_slots(tonumber(vb)))
end
vb = tonumber(vb)
local per_page = tonumber(redis.call('HGET', s, 'page_slots'))
local existed, wrote = {}, false
for i = 6, #ARGV, 6 do
  local id = ARGV[i + 1]
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then
    local slot = take_slot(s)
    put_vector(s, slot, ARGV[i + 3], vb, per_page)
    redis.call('HSET', KEYS[2], ARGV[i], struct.pack('<I4', slot) .. ARGV[i + 2])
    if ARGV[i + 4] ~= '' then redis.call('HSET', KEYS[3], id, ARGV[i + 4])
    elseif ARGV[i + 5] ~= '' then redis.call('HSET', KEYS[4], id, ARGV[i + 5]) end
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[2], '*', 'op', 'put', 'id', id)
    existed[#existed + 1] = 0
    wrote = true
  else
    existed[#existed + 1] = 1
  end
end
if wrote and ARGV[3] ~= '' then redis.call('HSETNX', s, 'model', ARGV[3]) end
return {'ok', existed}
"""

# Delete a batch of images of one gallery (record, vector slot, kept bytes or reference) with the removal marks of
# their blobs and their change-log entries. Returns how many existed, or -1 (nothing done) if a reference is not the
# one the caller read (it reads again). A gallery left empty starts its pages afresh.
# KEYS: settings, records, images, blobs, events, blob removals, removal marks...   ARGV: token, mark ttl ms, events
# maxlen, then per image: id field, id (decimal), its blob reference as read ('' none)
_DELETE = vector_pages.LUA + """
local s = KEYS[1]
for i = 4, #ARGV, 3 do
  if (redis.call('HGET', KEYS[4], ARGV[i + 1]) or '') ~= ARGV[i + 2] then return -1 end
end
if #KEYS > 6 then redis.call('INCR', KEYS[6]) end
for i = 7, #KEYS do redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2]) end
local per_page = tonumber(redis.call('HGET', s, 'page_slots') or '1')
local n = 0
for i = 4, #ARGV, 3 do
  local id = ARGV[i + 1]
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
  local rec = redis.call('HGET', KEYS[2], ARGV[i])
  if rec then
    redis.call('HDEL', KEYS[2], ARGV[i])
    free_slot(s, struct.unpack('<I4', rec), per_page)
    n = n + 1
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[3], '*', 'op', 'delete', 'id', id)
  end
end
if n > 0 and redis.call('HLEN', KEYS[2]) == 0 then drop_pages(s) end
return n
"""

# Set and clear metadata fields inside an image's record if it exists (no record resurrected by a late PATCH).
# KEYS: records.   ARGV: id field, the record's width, then pairs: position in the record, value ('' clears it)
_PATCH = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local rec = cmsgpack.unpack(string.sub(v, 5))
for j = #rec + 1, tonumber(ARGV[2]) do rec[j] = '' end
for i = 3, #ARGV, 2 do rec[tonumber(ARGV[i])] = ARGV[i + 1] end
redis.call('HSET', KEYS[1], ARGV[1], string.sub(v, 1, 4) .. cmsgpack.pack(rec))
return 1
"""

# The vectors of images (by id field), and the gallery's vector dtype, in one atomic read: a slot freed and taken by
# another image in between cannot mix one image's record with another's vector.
# KEYS: settings, records.   ARGV: id fields.   Returns {dtype or false, vector or false per id}
_READ_VECTORS = vector_pages.LUA + """
local s = KEYS[1]
local vb = tonumber(redis.call('HGET', s, 'vector_bytes') or '0')
local per_page = tonumber(redis.call('HGET', s, 'page_slots') or '1')
local out = {redis.call('HGET', s, 'vector_dtype')}
for i = 1, #ARGV do
  local rec = redis.call('HGET', KEYS[2], ARGV[i])
  out[i + 1] = false
  if rec then
    local v = get_vector(s, struct.unpack('<I4', rec), vb, per_page)
    if #v == vb then out[i + 1] = v end
  end
end
return out
"""

# One step of a scan of a gallery's vectors: the records of one HSCAN call and their vectors, read together (so a
# slot taken again since the records were read cannot happen), joined into two strings for a quick decode.
# KEYS: settings, records.   ARGV: cursor, count.   Returns {next cursor, dtype or false, id fields, vectors}
_SCAN_VECTORS = vector_pages.LUA + """
local s = KEYS[1]
local vb = tonumber(redis.call('HGET', s, 'vector_bytes') or '0')
local per_page = tonumber(redis.call('HGET', s, 'page_slots') or '1')
local page = redis.call('HSCAN', KEYS[2], ARGV[1], 'COUNT', ARGV[2])
local kv, ids, vectors = page[2], {}, {}
for i = 1, #kv, 2 do
  local v = get_vector(s, struct.unpack('<I4', kv[i + 1]), vb, per_page)
  if #v == vb then ids[#ids + 1] = kv[i]; vectors[#vectors + 1] = v end
end
return {page[1], redis.call('HGET', s, 'vector_dtype'), table.concat(ids), table.concat(vectors)}
"""

# One step of a compaction: move images (id field, the slot it was seen in) out of the pages past the first
# ceil(images / page_slots), each into a free slot of those first pages, so the pages behind empty and are freed.
# Free slots past them met on the way go to the head of the free list: writers take from its tail, so they fill the
# first pages too. An image whose record moved meanwhile is skipped; the step stops when no free slot is left in the
# first pages. Nothing any reader sees changes: ids, vectors and records stay, so no change-log entry.
# KEYS: settings, records.   ARGV: id field, slot seen, ...   Returns {moved, stopped (1: no free slot left)}
_COMPACT_STEP = vector_pages.LUA + """
local s = KEYS[1]
local vb = tonumber(redis.call('HGET', s, 'vector_bytes') or '0')
local per_page = tonumber(redis.call('HGET', s, 'page_slots') or '1')
local keep = math.ceil(redis.call('HLEN', KEYS[2]) / per_page) * per_page  -- slots of the pages kept
local moved, past = 0, {}
local function low_free_slot()
  while true do
    local f = redis.call('RPOP', s .. ':free-slots')
    if not f then return nil end
    f = tonumber(f)
    if f < keep then return f end
    past[#past + 1] = f
  end
end
local stopped = 0
for i = 1, #ARGV, 2 do
  local rec = redis.call('HGET', KEYS[2], ARGV[i])
  local from = tonumber(ARGV[i + 1])
  if rec and from >= keep and struct.unpack('<I4', rec) == from then
    local to = low_free_slot()
    if not to then stopped = 1; break end
    put_vector(s, to, get_vector(s, from, vb, per_page), vb, per_page)
    redis.call('HSET', KEYS[2], ARGV[i], struct.pack('<I4', to) .. string.sub(rec, 5))
    vacate(s, from, per_page)
    past[#past + 1] = from
    moved = moved + 1
  end
end
for _, f in ipairs(past) do redis.call('LPUSH', s .. ':free-slots', f) end
return {moved, stopped}
"""

# Put each staged vector into its image's slot, in place of the vector there, and drop the staged hash. Staged
# vectors of another size (another dtype or dimension) write the pages anew.
# KEYS: settings, records, staged.   Returns how many images changed.
_SWAP_STAGED = vector_pages.LUA + """
local s = KEYS[1]
local any = redis.call('HRANDFIELD', KEYS[3], 1, 'WITHVALUES')
if #any == 0 then return 0 end  -- an empty gallery: its next write sets the size
local vb = #any[2]
local resized = tonumber(redis.call('HGET', s, 'vector_bytes') or '0') ~= vb
if resized then
  drop_pages(s)
  redis.call('HSET', s, 'vector_bytes', vb, 'page_slots', page_slots(vb))
end
local per_page = tonumber(redis.call('HGET', s, 'page_slots'))
local n, cursor = 0, '0'
repeat  -- a scan rather than HGETALL: a million staged vectors would be a gigabyte inside Lua
  local page = redis.call('HSCAN', KEYS[3], cursor, 'COUNT', 1000)
  cursor = page[1]
  local kv = page[2]
  for i = 1, #kv, 2 do
    local rec = redis.call('HGET', KEYS[2], kv[i])
    if rec then
      local slot = struct.unpack('<I4', rec)
      if resized then
        slot = take_slot(s)
        put_vector(s, slot, kv[i + 1], vb, per_page)
        redis.call('HSET', KEYS[2], kv[i], struct.pack('<I4', slot) .. string.sub(rec, 5))
      else
        set_vector(s, slot, kv[i + 1], vb, per_page)
      end
      n = n + 1
    end
  end
until cursor == '0'
redis.call('DEL', KEYS[3])
return n
"""

# The sweep's claim on a blob nobody references: set the removal mark only if the gallery's image that could
# reference it (KEYS[1] field ARGV[1]) does not, and no other remover holds it. Atomic, unlike a read then a SET.
# KEYS: blobs, the removal mark, blob removals
_CLAIM_UNREFERENCED = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
redis.call('INCR', KEYS[3])
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


class StagingStale(RuntimeError):
    """The staged vectors no longer cover exactly the gallery's images (a write happened meanwhile)."""


class GalleryModelMismatch(RuntimeError):
    """A write of vectors of one model into a gallery whose vectors are of another (nothing was written)."""

    def __init__(self, gallery: str, stored: str, writer: str | None):
        super().__init__(f"gallery {gallery!r} holds vectors of model {stored}; these are of model {writer}")
        self.gallery, self.stored, self.writer = gallery, stored, writer


class _BlobBusy(Exception):
    """A blob a write needs is being removed right now: wait for its removal mark to go, then write again."""


@dataclass(frozen=True)
class _Pending:
    """An image :meth:`RedisStore.put_many` is about to write: its vector, metadata and kept bytes (``blob``: their
    key in the blob store when they go to disk)."""

    vector: np.ndarray
    meta: dict[str, str]
    data: bytes | None
    blob: str | None


@dataclass(frozen=True)
class Compaction:
    """:meth:`RedisStore.compact_vectors` of one gallery: images moved, and its vector pages before and after."""

    gallery: str
    moved: int
    pages_before: int
    pages_after: int


@dataclass(frozen=True)
class MigrationResult:
    """:meth:`RedisStore.migrate_image_bytes` of one gallery: images whose bytes moved to disk, entries dropped
    because their image is gone, and entries left in Redis because their id is not the bytes' content id."""

    moved: int = 0
    dropped: int = 0
    skipped: int = 0


@contextmanager
def _reshard_retryable() -> Iterator[None]:
    """A script stopped by a live reshard of its gallery's hash slot (a page key it derives already moved:
    :mod:`index.vector_pages`) raises Redis Cluster's TryAgainError, as the other passing cluster states do, instead
    of a plain ResponseError."""
    try:
        yield
    except redis.ResponseError as e:
        if "non local key" in str(e):
            raise redis.exceptions.TryAgainError(f"the gallery's hash slot is moving between masters: {e}") from e
        raise


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
        self._claim_unreferenced = client.register_script(_CLAIM_UNREFERENCED)
        self._read_vectors = client.register_script(_READ_VECTORS)
        self._scan_vectors = client.register_script(_SCAN_VECTORS)
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

    def _script(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a Lua script (its keys all in one slot) as a change: inside MULTI/EXEC on :meth:`_pipeline`, so it
        waits for the AOF fsync or the replicas as every write does. EVAL rather than EVALSHA: no NOSCRIPT to
        recover from inside a transaction, and the source is small beside a batch's vectors."""
        with self._pipeline() as pipe, _reshard_retryable():
            pipe.execute_command("EVAL", source, len(keys), *keys, *args)  # (a cluster pipeline has no eval())
            return pipe.execute()[0]

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
    def k_records(cls, g: str) -> str:
        return cls.k_gallery(g) + ":records"

    @classmethod
    def k_page(cls, g: str, n: int) -> str:
        """One page of the gallery's vectors (:mod:`index.vector_pages`, whose Lua derives the same names)."""
        return f"{cls.k_gallery(g)}:page:{int(n)}"

    @classmethod
    def k_free_slots(cls, g: str) -> str:
        return cls.k_gallery(g) + ":free-slots"

    @classmethod
    def k_page_used(cls, g: str) -> str:
        return cls.k_gallery(g) + ":page-used"

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
    def k_blob_removals(cls, g: str) -> str:
        return cls.k_gallery(g) + ":blob-removals"

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
    def k_activation() -> str:
        return GLOBAL_PREFIX + "activation"

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
        return int(self.r.hlen(self.k_records(gallery)))

    def counts(self, galleries: Iterable[str] | None = None) -> dict[str, int]:
        """Gallery -> its number of images (stored vectors), for ``galleries`` (default: every one), in one round
        trip."""
        names = self.list_galleries() if galleries is None else list(galleries)
        pipe = self.r.pipeline(transaction=False)
        for g in names:
            pipe.hlen(self.k_records(g))
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
        pipe.hlen(self.k_records(gallery))
        pipe.xrevrange(self.k_gallery_events(gallery), count=1)
        n, last = pipe.execute()
        return int(n), (last[0][0].decode() if last else ZERO)

    def images_without_bytes(self) -> dict[str, int]:
        """Gallery -> how many of its images have no kept bytes, for the galleries that have such images."""
        names = self.list_galleries()
        pipe = self.r.pipeline(transaction=False)
        for g in names:
            pipe.hlen(self.k_records(g))
            pipe.hlen(self.k_images(g))
            pipe.hlen(self.k_blobs(g))
        res = pipe.execute()
        missing = {g: int(n) - int(in_redis) - int(on_disk)
                   for g, n, in_redis, on_disk in zip(names, res[::3], res[1::3], res[2::3])}
        return {g: n for g, n in missing.items() if n > 0}

    def gallery_info(self, gallery: str) -> dict[str, Any] | None:
        """``{"name", "count", "created_at", "retention_days", "model"}`` or None if the gallery does not exist."""
        if not self.gallery_exists(gallery):
            return None
        pipe = self.r.pipeline(transaction=True)
        pipe.hlen(self.k_records(gallery))
        pipe.hmget(self.k_gallery(gallery), "created_at", "retention_days", "model")
        return _gallery_info(gallery, *pipe.execute())

    def list_gallery_info(self) -> list[dict[str, Any]]:
        """:meth:`gallery_info` of every gallery, in one round trip after the listing."""
        names = self.list_galleries()
        pipe = self.r.pipeline(transaction=False)
        for g in names:
            pipe.hlen(self.k_records(g))
            pipe.hmget(self.k_gallery(g), "created_at", "retention_days", "model")
        res = pipe.execute()
        return [_gallery_info(g, n, fields) for g, n, fields in zip(names, res[::2], res[1::2])]

    def gallery_models(self, galleries: Iterable[str] | None = None) -> dict[str, str | None]:
        """Gallery -> the model its vectors were embedded with (None: not recorded, a gallery of an older layout),
        for ``galleries`` (default: every one), in one round trip."""
        names = self.list_galleries() if galleries is None else list(galleries)
        pipe = self.r.pipeline(transaction=False)
        for g in names:
            pipe.hget(self.k_gallery(g), "model")
        return {g: _s(m) for g, m in zip(names, pipe.execute())}

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
        (and the page geometry in them) for :meth:`create_gallery` to find."""
        self._drop_all_blobs(gallery, batch)
        pages = self.page_keys(gallery)
        for start in range(0, len(pages), batch):
            self.r.unlink(*pages[start:start + batch])
        # UNLINK: a hash of millions of entries is freed in the background, not while Redis serves nobody. With the
        # hashes of layouts 2 and 3 (":vectors", ":entries"): a delete that crashed under them left them unlisted,
        # where no migration finds them
        self.r.unlink(self.k_records(gallery), self.k_images(gallery), self.k_blobs(gallery), self.k_staged(gallery),
                      self.k_free_slots(gallery), self.k_page_used(gallery), self.k_blob_removals(gallery),
                      self.k_gallery_events(gallery), self.k_gallery(gallery) + ":vectors",
                      self.k_gallery(gallery) + ":entries", self.k_gallery(gallery))
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
        pipe.incr(self.k_blob_removals(gallery))
        for key in keys:
            pipe.set(self.k_blob_mark(gallery, key), token, px=BLOB_MARK_TTL_MS)
        pipe.execute()
        self._remove_blobs(gallery, keys, token)

    def page_keys(self, gallery: str) -> list[str]:
        """The keys every page of the gallery's vectors may have (one past another is freed when it empties)."""
        per_page, next_slot = self.r.hmget(self.k_gallery(gallery), "page_slots", "next_slot")
        return [self.k_page(gallery, n) for n in range(-(-int(next_slot or 0) // int(per_page or 1)))]

    def freeable_pages(self, gallery: str) -> int:
        """How many of the gallery's vector pages :meth:`compact_vectors` would free now (one round trip)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hlen(self.k_records(gallery))
        pipe.hlen(self.k_page_used(gallery))
        pipe.hget(self.k_gallery(gallery), "page_slots")
        images, pages, per_page = pipe.execute()
        return max(0, int(pages) - -(-int(images) // int(per_page or 1)))

    def compact_vectors(self, gallery: str, batch: int = 500) -> "Compaction":
        """Move the images of the gallery's last pages into free slots of its first ``ceil(images / page_slots)``,
        :data:`_COMPACT_STEP` by step, so the pages behind empty and are freed: the memory a large delete left in
        half-empty pages comes back. Safe while the service writes and deletes (each step checks every image where
        it moves it; what a writer puts in a last page meanwhile stays there, for the next run)."""
        before = int(self.r.hlen(self.k_page_used(gallery)))
        per_page = int(self.r.hget(self.k_gallery(gallery), "page_slots") or 1)
        fields, slots = [], []
        for field, raw in self.r.hscan_iter(self.k_records(gallery), count=1000):
            fields.append(field)
            slots.append(record_slot(raw))
        keep = -(-len(fields) // per_page) * per_page
        movers = sorted((slot, field) for field, slot in zip(fields, slots) if slot >= keep)
        moved = 0
        for start in range(0, len(movers), batch):
            args = [x for slot, field in movers[start:start + batch] for x in (field, slot)]
            step_moved, stopped = self._script(_COMPACT_STEP, [self.k_gallery(gallery), self.k_records(gallery)],
                                               args)
            moved += int(step_moved)
            if int(stopped):
                break
        return Compaction(gallery, moved, before, int(self.r.hlen(self.k_page_used(gallery))))

    # ------------------------------------------------------------------ images
    def exists(self, gallery: str, id_: int) -> bool:
        return bool(self.r.hexists(self.k_records(gallery), id_field(id_)))

    def exists_many(self, gallery: str, ids: Iterable[int]) -> list[bool]:
        """Whether each image exists, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hexists(self.k_records(gallery), id_field(i))
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
        """Store several images ``(id, vector, metadata)`` in ONE atomic step (the script :data:`_PUT`).

        ``images``, aligned with ``records``, are the original bytes to keep (None: keep none); on disk (the
        blob store, fsynced before the script) or in Redis, by ``image_storage``. On disk an image's id must be its
        content id, ``image_id(gallery, bytes)`` (what makes a blob one image's: see the module docstring).
        ``model``: the model that embedded the vectors (recorded as the gallery's by its first write).
        Returns, per record, whether it already existed (existing images are left untouched). The script writes
        an image only where it has no record, so of concurrent writers of the same id exactly one reports it
        ``created``. One step means one AOF fsync for the whole batch.
        """
        validate_gallery_name(gallery)
        if not records:
            return []
        if images is not None and len(images) != len(records):
            raise ValueError(f"got {len(images)} images for {len(records)} records")
        kept = [None if b is None else bytes(b) for b in images] if images is not None else [None] * len(records)
        on_disk = self.image_storage == "disk"
        created_ms = int(time.time() * 1000)
        pending: dict[int, _Pending] = {}  # the first occurrence of each id: a later one "exists"
        for (id_, vector, metadata), data in zip(records, kept):
            id_ = int(id_)
            meta = {k: _s(v) for k, v in (metadata or {}).items() if k in METADATA_FIELDS and v is not None}
            key = None
            if data is not None and on_disk:
                if image_id(gallery, data) != id_:
                    raise ValueError(f"image {id_}: kept bytes on disk need their content id, "
                                     f"image_id(gallery, bytes) = {image_id(gallery, data)}")
                key = blob_key(data)
            pending.setdefault(id_, _Pending(np.asarray(vector, dtype=np.float32).reshape(-1), meta, data, key))
        # Images that exist already are left untouched and write nothing (their blobs neither); one that appears
        # meanwhile is found by the script itself.
        existed = dict(zip(pending, self.exists_many(gallery, pending)))
        todo = {i: p for i, p in pending.items() if not existed[i]}
        if todo:
            existed.update(self._put_new(gallery, todo, created_ms, model))
        seen: set[int] = set()
        out = []
        for id_, _, _ in records:
            out.append(existed[int(id_)] or int(id_) in seen)
            seen.add(int(id_))
        return out

    def _put_new(self, gallery: str, todo: dict[int, "_Pending"], created_ms: int, model: str | None
                 ) -> dict[int, bool]:
        """Write images that did not exist a moment ago, by :data:`_PUT`; per id, whether it existed after all.
        What the script refuses is set right (the gallery listed, its leftovers cleared, the vectors encoded in its
        dtype, a blob's removal waited for) and the batch written again."""
        ids = list(todo)
        marks = sorted({self.k_blob_mark(gallery, p.blob) for p in todo.values() if p.blob is not None})
        keys = [self.k_gallery(gallery), self.k_records(gallery), self.k_blobs(gallery), self.k_images(gallery),
                self.k_gallery_events(gallery), self.k_blob_removals(gallery), *marks]
        codec = self.vector_codec(gallery) if self.gallery_exists(gallery) else self.codec
        deadline = time.monotonic() + BLOB_MARK_TTL_MS / 1000 + 5.0
        while True:
            removals = ""
            if marks:
                # A remover unlinks a blob only while its mark is set, and it sets the mark in the same step as it
                # counts a removal: no mark now and the same count when the script runs mean no remover took the
                # blobs written in between. (One set now: wait for it first.)
                check = self.r.pipeline(transaction=False)
                check.get(self.k_blob_removals(gallery))
                for m in marks:
                    check.exists(m)
                count, *busy = check.execute()
                if any(busy):
                    self._wait_for_marks(deadline, ", ".join(marks))
                    continue
                removals = _s(count) or "0"
            # Durable before the references to them are: a crash leaves orphans at worst. One at a time: concurrent
            # writers already overlap their fsyncs (a pool per batch measured no faster with 4 writers).
            blobs = self._blobs(gallery) if marks else None
            vectors = [codec.encode(p.vector) for p in todo.values()]
            vector_bytes = len(vectors[0])
            for id_, vector in zip(todo, vectors):
                if len(vector) != vector_bytes:
                    raise ValueError(f"image {id_}: a vector of {len(vector) // codec.itemsize} dimensions in a "
                                     f"batch of {vector_bytes // codec.itemsize}")
            args: list[Any] = [codec.name, self.events_maxlen, model or "", removals, vector_bytes]
            for (id_, p), vector in zip(todo.items(), vectors):
                if p.blob is not None:
                    blobs.put(p.data)
                args += [id_field(id_), str(id_), pack_record(created_ms, p.meta), vector,
                         bytes.fromhex(p.blob) if p.blob is not None else b"",
                         p.data if p.blob is None and p.data is not None else b""]
            verdict, *rest = self._script(_PUT, keys, args)
            verdict = _s(verdict)
            if verdict == "ok":
                return {id_: bool(x) for id_, x in zip(ids, rest[0])}
            if verdict in ("unlisted", "leftovers"):
                if verdict == "leftovers":  # of a delete that crashed half-way: not this gallery's images
                    self._delete_keys(gallery)
                self.create_gallery(gallery)  # listed before anything of it is written (module docstring)
                codec = self.vector_codec(gallery)
            elif verdict == "dtype":  # another replica's first write chose the gallery's dtype
                codec = VectorCodec.named(_s(rest[0]))
            elif verdict == "busy":  # a blob is or was being removed: wait for its mark to go, then write it again
                self._wait_for_marks(deadline, _s(rest[0]))
            elif verdict == "model":
                raise GalleryModelMismatch(gallery, _s(rest[0]), model)
            elif verdict == "size":
                raise ValueError(f"gallery {gallery!r} holds vectors of {int(rest[0]) // codec.itemsize} "
                                 f"dimensions; these have {vector_bytes // codec.itemsize}")
            else:  # pragma: no cover - the script answers nothing else
                raise RuntimeError(f"unexpected answer from the write script: {verdict!r}")

    def get(self, gallery: str, id_: int) -> StoredImage | None:
        return self.get_many(gallery, [id_])[0]

    def get_many(self, gallery: str, ids) -> list[StoredImage | None]:
        ids = [int(i) for i in ids]
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=True)
        pipe.hmget(self.k_records(gallery), [id_field(i) for i in ids])
        pipe.hget(self.k_gallery(gallery), "model")
        records, model = pipe.execute()
        out: list[StoredImage | None] = []
        for i, raw in zip(ids, records):
            if raw is None:
                out.append(None)
                continue
            created, meta = record_metadata(raw)
            out.append(StoredImage(id=i, gallery=gallery,
                                   metadata={**meta, "created_at": iso_from_ms(created), "model": _s(model)}))
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
        args: list[Any] = [id_field(id_), len(METADATA_FIELDS) + 1]
        for k, v in changes.items():
            if k not in METADATA_FIELDS:
                raise ValueError(f"{k!r} is not a metadata field ({', '.join(METADATA_FIELDS)})")
            if v == "":
                raise ValueError(f"{k}: empty value (None removes the field)")
            args += [field_position(k), "" if v is None else str(v)]
        return bool(self._script(_PATCH, [self.k_records(gallery)], args))

    def delete(self, gallery: str, id_: int) -> bool:
        """Delete one image (vector, metadata, kept bytes). Returns False if it did not exist."""
        return self.delete_many(gallery, [id_]) == 1

    def iter_vectors(self, gallery: str, batch: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(ids int64 (n,), vectors float32 (n, d))`` batches, by HSCAN (never KEYS) inside a script that
        reads each batch's vectors with its records. HSCAN may yield an image twice (while Redis rehashes)."""
        cursor = b"0"
        while True:
            with _reshard_retryable():
                cursor, dtype, ids, vectors = self._scan_vectors(
                    keys=[self.k_gallery(gallery), self.k_records(gallery)], args=[cursor, batch])
            if ids:
                codec = VectorCodec.named(_s(dtype) or LEGACY_DTYPE)
                ids = np.frombuffer(ids, dtype=">i8").astype(np.int64)
                yield ids, codec.decode(vectors, codec.dim_of(vectors) // len(ids))
            if cursor in (b"0", 0, "0"):
                return

    # ------------------------------------------------------------------ bulk deletion and retention
    def get_vectors(self, gallery: str, ids: Iterable[int]) -> list[np.ndarray | None]:
        """The stored vectors of ``ids`` as float32 (None where absent), in one round trip."""
        codec, raw = self.get_raw_vectors(gallery, ids)
        return [None if v is None else codec.decode(v) for v in raw]

    def get_raw_vectors(self, gallery: str, ids: Iterable[int]) -> tuple[VectorCodec, list[bytes | None]]:
        """``(codec, the stored vectors of ids as they are kept)`` (None where absent), read together in one
        MULTI/EXEC: for callers that check each length against ``codec.nbytes(dim)`` and decode many at once
        (``codec.decode_many``)."""
        with _reshard_retryable():
            dtype, *raws = self._read_vectors(keys=[self.k_gallery(gallery), self.k_records(gallery)],
                                              args=[id_field(i) for i in ids])
        return VectorCodec.named(_s(dtype) or LEGACY_DTYPE), raws

    def iter_image_ids(self, gallery: str, batch: int = 1000) -> Iterator[list[int]]:
        """Batches of the gallery's image ids (HSCAN of its records; NOVALUES where Redis >= 7.4 has it)."""
        seen: set[int] = set()  # HSCAN may return a field twice while Redis rehashes
        chunk: list[int] = []
        for item in self._hscan_fields(self.k_records(gallery), batch):
            id_ = field_id(item)
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
        """Batches of ``(id, {field: value})`` for every image of the gallery (absent fields are None); ``fields``
        from :data:`METADATA_FIELDS` and ``created_at``."""
        seen: set[int] = set()  # HSCAN may return a field twice while Redis rehashes
        chunk: list[tuple[int, dict[str, str | None]]] = []
        for field, raw in self.r.hscan_iter(self.k_records(gallery), count=batch):
            id_ = field_id(field)
            if id_ in seen:
                continue
            seen.add(id_)
            created, meta = record_metadata(raw)
            meta["created_at"] = iso_from_ms(created)
            chunk.append((id_, {f: meta.get(f) for f in fields}))
            if len(chunk) >= batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def delete_many(self, gallery: str, ids: Sequence[int]) -> int:
        """Delete these images (record, vector, kept bytes) with their ``delete`` change-log entries in ONE atomic
        step (the script :data:`_DELETE`); the caller batches. Returns how many existed. Their blobs are removed
        after it (the removal rule of the module docstring)."""
        ids = [int(i) for i in dict.fromkeys(int(i) for i in ids)]
        if not ids:
            return 0
        fields = [str(i) for i in ids]
        token = uuid.uuid4().hex
        while True:
            # the blobs these images reference; the script deletes only if they are still these
            refs = self.r.hmget(self.k_blobs(gallery), fields)
            removing = sorted({raw.hex() for raw in refs if raw is not None})
            keys = [self.k_gallery(gallery), self.k_records(gallery), self.k_images(gallery), self.k_blobs(gallery),
                    self.k_gallery_events(gallery), self.k_blob_removals(gallery),
                    *(self.k_blob_mark(gallery, k) for k in removing)]
            args: list[Any] = [token, BLOB_MARK_TTL_MS, self.events_maxlen]
            for id_, f, raw in zip(ids, fields, refs):
                args += [id_field(id_), f, raw if raw is not None else b""]
            n = int(self._script(_DELETE, keys, args))
            if n >= 0:
                break
        self._remove_blobs(gallery, removing, token)
        return n

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
        records = self.r.hmget(self.k_records(gallery), [id_field(id_) for id_, _ in chunk])
        out = []
        # an image deleted since the scan has no record any more: leave it out
        for (id_, value), record in zip(chunk, records):
            if record is None:
                continue
            data = self._read_blob(gallery, id_, value.hex()) if on_disk else value
            if data is not None:
                out.append((id_, data, record_metadata(record)[1]["camera_id"]))
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
            keys=[self.k_blobs(gallery), self.k_blob_mark(gallery, key), self.k_blob_removals(gallery)],
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

    @staticmethod
    def _wait_for_marks(deadline: float, what: object) -> None:
        """A short pause before a write tries again while blobs are being removed; raises past ``deadline`` (a removal
        mark expires by itself, so the wait is bounded)."""
        if time.monotonic() > deadline:
            raise BlobError(f"blobs still being removed after {BLOB_MARK_TTL_MS} ms: {what}")
        time.sleep(0.02)

    def _transaction_waiting_for_blobs(self, func: Callable[[redis.client.Pipeline], None], *watches: str) -> list:
        """:meth:`_transaction`, again after a short wait while a blob it writes is being removed (the removal
        mark expires by itself, so the wait is bounded)."""
        deadline = time.monotonic() + BLOB_MARK_TTL_MS / 1000 + 5.0
        while True:
            try:
                return self._transaction(func, *watches)
            except _BlobBusy as e:
                self._wait_for_marks(deadline, e)

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
            # Read on another connection; WATCH still aborts EXEC on any change after it (a delete of one of these
            # images HDELs its bytes from the WATCHed hash; a new removal mark is WATCHed itself).
            check = self.r.pipeline(transaction=False)
            for i in ids:
                check.hexists(self.k_records(gallery), id_field(i))
            for m in marks:
                check.exists(m)
            res = check.execute()
            busy = [m for m, x in zip(marks, res[len(ids):]) if x]
            if busy:
                raise _BlobBusy(busy)
            present = [i for i, ex in zip(ids, res[:len(ids)]) if ex]
            blobs = self._blobs(gallery)
            for i in present:
                blobs.put(eligible[i])  # durable before its reference, as put_many does
            pipe.multi()
            if present:
                pipe.hset(self.k_blobs(gallery), mapping={str(i): bytes.fromhex(keys[i]) for i in present})
            pipe.hdel(self.k_images(gallery), *(str(i) for i in ids))
            result = (len(present), len(ids) - len(present), len(chunk) - len(ids))

        # WATCH the bytes' hash rather than the records: ingest goes on touching those, and would starve this
        self._transaction_waiting_for_blobs(txn, self.k_images(gallery), *marks)
        return result

    # ------------------------------------------------------------------ re-embedding (model activation)
    def active_bundle(self) -> str | None:
        return _s(self.r.get(self.k_active_bundle()))

    def vector_ids(self, gallery: str) -> set[int]:
        return {field_id(x) for x in self.r.hkeys(self.k_records(gallery))}

    def staged_ids(self, gallery: str) -> set[int]:
        return {field_id(x) for x in self.r.hkeys(self.k_staged(gallery))}

    def clear_staged(self, gallery: str) -> None:
        self.r.delete(self.k_staged(gallery))

    def stage_vectors(self, gallery: str, ids, vectors: np.ndarray) -> None:
        """Stage vectors in this store's dtype (``commit_staged`` records it as the gallery's: an activation is
        how an existing gallery changes dtype)."""
        if len(ids):
            rows = self.codec.encode_rows(np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1))
            self.r.hset(self.k_staged(gallery), mapping={id_field(i): v for i, v in zip(ids, rows)})

    def unstage(self, gallery: str, ids) -> None:
        ids = [id_field(i) for i in ids]
        if ids:
            self.r.hdel(self.k_staged(gallery), *ids)

    def commit_staged(self, galleries: Iterable[str], model: str, bundle_id: str,
                      watch: Sequence[str] = (), precondition: Callable[[Any], None] | None = None,
                      committed: set[str] | None = None) -> None:
        """Put every gallery's staged vectors into its pages (and its vector_dtype to this store's, in which
        :meth:`stage_vectors` wrote them, its model to ``model``) and record ``bundle_id`` as active. Its time grows
        with the images (each vector is rewritten in place, :data:`_SWAP_STAGED`): about a second per million on one
        core, while Redis serves nothing else.

        Raises :class:`StagingStale` (nothing more written) unless the galleries are exactly the store's and
        each one's staged ids are exactly its images. ``precondition(pipe)`` may read the ``watch`` keys
        and raise to abort; a change to any of them before the switch makes the check run again.

        On one server all of it is ONE transaction. Redis Cluster cannot run a transaction over several slots, so
        there (:meth:`_commit_per_gallery`) each gallery switches in a transaction of its own and is added to
        ``committed``; pass the same set again after a :class:`StagingStale` (those are done).
        """
        names = sorted(galleries)
        if self.cluster:
            self._commit_per_gallery(names, model, bundle_id, watch, precondition,
                                     set() if committed is None else committed)
            return
        keys = [self.k_galleries(), *watch, *(self.k_records(g) for g in names), *(self.k_staged(g) for g in names),
                *(self.k_gallery(g) for g in names)]

        def txn(pipe: redis.client.Pipeline) -> None:
            self._check_listing(pipe, names)
            for g in names:
                self._check_staged(pipe, g)
            if precondition is not None:
                precondition(pipe)
            pipe.multi()
            for g in names:
                self._queue_switch(pipe, g, model)
            self._queue_activation(pipe, bundle_id)

        self._transaction(txn, *keys)

    def _commit_per_gallery(self, names: list[str], model: str, bundle_id: str, watch: Sequence[str],
                            precondition: Callable[[Any], None] | None, committed: set[str]) -> None:
        """:meth:`commit_staged` on Redis Cluster. First, while the job still runs (``precondition``, in the global
        slot with its ``watch`` keys), the intent is recorded (``reid:{global}:activation``); then each gallery
        switches in its own slot; then, if the listing is still ``names``, the bundle is recorded active and the
        intent cleared, in one transaction of the global slot. Once one gallery has switched there is no way back
        (its old vectors are gone): a cancel is no longer honoured, and a crash leaves the intent, which the next
        start reports (:meth:`interrupted_activation`) until the activation runs again."""
        if not committed:
            def intend(pipe: redis.client.Pipeline) -> None:
                self._check_listing(pipe, names)
                if precondition is not None:
                    precondition(pipe)
                pipe.multi()
                pipe.set(self.k_activation(), bundle_id)

            self._transaction(intend, self.k_galleries(), *watch)
        for g in names:
            if g in committed:
                continue

            def switch(pipe: redis.client.Pipeline, g: str = g) -> None:
                self._check_staged(pipe, g)
                pipe.multi()
                self._queue_switch(pipe, g, model)

            self._transaction(switch, self.k_records(g), self.k_staged(g), self.k_gallery(g))
            committed.add(g)

        def activate(pipe: redis.client.Pipeline) -> None:
            self._check_listing(pipe, names)
            pipe.multi()
            self._queue_activation(pipe, bundle_id)
            pipe.delete(self.k_activation())

        self._transaction(activate, self.k_galleries())

    def interrupted_activation(self) -> str | None:
        """The bundle whose activation switched some galleries on Redis Cluster and did not finish (a crash), if
        any: those galleries hold its vectors while the store's active bundle is another."""
        return _s(self.r.get(self.k_activation()))

    def _check_listing(self, pipe: redis.client.Pipeline, names: list[str]) -> None:
        current = sorted(_s(x) for x in pipe.smembers(self.k_galleries()))
        if current != names:
            raise StagingStale(f"galleries changed: staged {names}, store has {current}")

    def _check_staged(self, pipe: redis.client.Pipeline, g: str) -> None:
        if set(pipe.hkeys(self.k_staged(g))) != set(pipe.hkeys(self.k_records(g))):
            raise StagingStale(f"gallery {g}: images changed since they were staged")

    def _queue_switch(self, pipe: redis.client.Pipeline, g: str, model: str) -> None:
        pipe.execute_command("EVAL", _SWAP_STAGED, 3, self.k_gallery(g), self.k_records(g), self.k_staged(g))
        pipe.hset(self.k_gallery(g), mapping={"vector_dtype": self.codec.name, "model": model})

    def _queue_activation(self, pipe: redis.client.Pipeline, bundle_id: str) -> None:
        pipe.set(self.k_active_bundle(), bundle_id)
        self._global_event(pipe, "activate", "", bundle_id)  # replicas switch models too (service.follower)


def _gallery_info(gallery: str, count: Any, fields: Sequence[Any]) -> dict[str, Any]:
    created, days, model = fields
    return {"name": gallery, "count": int(count), "created_at": _s(created),
            "retention_days": int(days) if days is not None else None, "model": _s(model)}
