"""Where a gallery's vectors live in Redis (key layout 4): packed side by side in pages, each image's at a slot.

    reid:gallery:{g}:page:<n>       STRING  slots n*P .. n*P+P-1, each ``vector_bytes`` long (P = ``page_slots``)
    reid:gallery:{g}:free-slots     LIST    slots freed by deletes, taken again (last freed first) before new ones
    reid:gallery:{g}:page-used      HASH    page number -> how many of its slots hold an image
    reid:gallery:{g}                HASH    (the settings) vector_bytes, page_slots, next_slot: the page geometry
                                            and the first slot never handed out

Why pages: a vector in a Redis value of its own (or in one with the image's record) is ~1,030-1,120 bytes, which
jemalloc, Redis's default allocator, rounds up to its 1,280-byte size class; one page of 255 float32 vectors of 256
dimensions fills its 256 KiB exactly, so a vector costs 1,028 bytes. A page grows in steps that each fill a size
class (4 KiB, 8 KiB, ...), so a small gallery does not hold a quarter of a megabyte: growing it with SETRANGE past its
end would let Redis double the allocation instead. A page whose images are all deleted is freed at once; its
slots stay in the free list, and taking one of them makes the page again. Deletes spread over a gallery leave its
pages half empty: :meth:`index.store.RedisStore.compact_vectors` moves the images of its last pages into free
slots of the first ones, so the last pages empty and are freed.

All of it runs inside the store's Lua scripts (:data:`LUA`, put in front of each), one gallery's keys in one hash
slot: the page keys are derived from the settings key (``KEYS[1]``), not declared, which Redis Cluster allows for
keys of the script's own hash slot. The one case where that shows: while a live reshard is moving a gallery's hash
slot to another master, a script that reaches a page already moved stops with Redis's "non local key" error (the
store raises TryAgainError, which the service answers with 503 and Retry-After, as for any redirection). Each
image it had written by then is whole, with its change-log entry; a slot it had taken for the next image is lost
to the gallery (never handed out again).
"""

from __future__ import annotations

__all__ = ["LUA", "PAGE_BYTES"]

#: the size a full page fills: a jemalloc size class, and 64 whole 4 KiB pages for glibc's mmap
PAGE_BYTES = 1 << 18
#: room left in every page step for the string's header (9 bytes), its terminator, and an allocator's header
_SLACK = 64
_FIRST_STEP = 4096


LUA = f"""
local function page_key(s, n) return s .. ':page:' .. n end

-- how many vectors of vb bytes a full page holds
local function page_slots(vb) return math.max(1, math.floor(({PAGE_BYTES} - {_SLACK}) / vb)) end

local function take_slot(s)
  local free = redis.call('RPOP', s .. ':free-slots')
  if free then return tonumber(free) end
  return redis.call('HINCRBY', s, 'next_slot', 1) - 1
end

local function page_capacity(vb, want, per_page)
  local bytes = {_FIRST_STEP}
  while math.floor((bytes - {_SLACK}) / vb) < math.min(want, per_page) do bytes = bytes * 2 end
  return math.min(per_page, math.max(want, math.floor((bytes - {_SLACK}) / vb)))
end

local function put_vector(s, slot, v, vb, per_page)
  local n = math.floor(slot / per_page)
  local key = page_key(s, n)
  local at = (slot % per_page) * vb
  local len = redis.call('STRLEN', key)
  if len < at + vb then
    local cur = ''
    if len > 0 then cur = redis.call('GET', key) end
    redis.call('SET', key, cur .. string.rep('\\0', page_capacity(vb, slot % per_page + 1, per_page) * vb - len))
  end
  redis.call('SETRANGE', key, at, v)
  redis.call('HINCRBY', s .. ':page-used', n, 1)
end

-- the slot holds no image any more: its page counts one less, and goes when it counts none
local function vacate(s, slot, per_page)
  local n = math.floor(slot / per_page)
  if redis.call('HINCRBY', s .. ':page-used', n, -1) <= 0 then
    redis.call('HDEL', s .. ':page-used', n)
    redis.call('DEL', page_key(s, n))
  end
end

local function free_slot(s, slot, per_page)
  vacate(s, slot, per_page)
  redis.call('RPUSH', s .. ':free-slots', slot)
end

local function get_vector(s, slot, vb, per_page)
  local at = (slot % per_page) * vb
  return redis.call('GETRANGE', page_key(s, math.floor(slot / per_page)), at, at + vb - 1)
end

-- another vector of the same size in a slot that holds an image (its page exists and counts it already)
local function set_vector(s, slot, v, vb, per_page)
  redis.call('SETRANGE', page_key(s, math.floor(slot / per_page)), (slot % per_page) * vb, v)
end

local function drop_pages(s)
  local per_page = tonumber(redis.call('HGET', s, 'page_slots') or '1')
  local pages = math.ceil(tonumber(redis.call('HGET', s, 'next_slot') or '0') / per_page)
  for n = 0, pages - 1 do redis.call('DEL', page_key(s, n)) end
  redis.call('DEL', s .. ':free-slots', s .. ':page-used')
  redis.call('HSET', s, 'next_slot', 0)
end
"""
