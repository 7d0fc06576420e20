"""Writes that bypass :class:`index.store.RedisStore`'s scripts: no change-log entry, no dtype record. For tests that
need a store in a state the service never leaves it in (an older version's gallery, a writer that skips the log)."""

from __future__ import annotations

import struct

from index import vector_pages
from index.image_record import id_field, pack_record
from index.store import RedisStore

# an image's vector in a slot and its record, as the write script puts them, and nothing else
_WRITE = vector_pages.LUA + """
local s = KEYS[1]
local vb = #ARGV[2]
if not redis.call('HGET', s, 'vector_bytes') then
  redis.call('HSET', s, 'vector_bytes', vb, 'page_slots', page_slots(vb))
end
local slot = take_slot(s)
put_vector(s, slot, ARGV[2], vb, tonumber(redis.call('HGET', s, 'page_slots')))
redis.call('HSET', KEYS[2], ARGV[1], struct.pack('<I4', slot) .. ARGV[3])
return slot
"""


def write_image_unlogged(store: RedisStore, gallery: str, id_: int, vector: bytes, metadata: dict | None = None,
                         created_ms: int = 0) -> int:
    """Write one image's vector bytes and record; returns its slot."""
    return int(store.r.eval(_WRITE, 2, store.k_gallery(gallery), store.k_records(gallery), id_field(id_), vector,
                            pack_record(created_ms, metadata or {})))


def slotted(record: bytes, slot: int = 0) -> bytes:
    """A record as the records hash holds it: its slot in front."""
    return struct.pack("<I", slot) + record
