"""The change logs: Redis streams written by the store in the same transaction as each change.

Since key layout 2 (Redis Cluster ready) every gallery has its own stream, ``reid:gallery:{g}:events``, in the gallery's
hash slot, so a change and its entry commit together on whichever node holds the gallery; its entries are ``op``
(put | delete | activate) and ``id`` (the image id; the bundle id for ``activate``). The global stream
``reid:{global}:events`` holds what is not one gallery's: ``create`` and ``drop`` of a gallery, and ``activate`` of
a model (``gallery`` names the gallery, ``id`` the bundle).

A replica's position in the logs is a :data:`Positions` mapping: stream name ("" for the global one, else the
gallery) -> the id of the last entry applied. Stream ids are ``<ms>-<seq>`` and are compared as integer pairs,
within one stream only (different streams live on different nodes with their own clocks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import redis

__all__ = ["GLOBAL", "Event", "EventReader", "Positions", "StreamInfo", "ZERO", "decode", "parse_id", "read_range",
           "stream_info"]

ZERO = "0-0"
#: the name of the global stream in a :data:`Positions` mapping
GLOBAL = ""
#: stream name -> last entry id applied
Positions = dict[str, str]


def parse_id(s: str | bytes | None) -> tuple[int, int]:
    if s is None:
        return (0, 0)
    if isinstance(s, bytes):
        s = s.decode()
    ms, _, seq = s.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class Event:
    id: str
    op: str
    gallery: str
    ref: str  #: image id (decimal) for put/delete, bundle id for activate, "" for create/drop
    stream: str = GLOBAL  #: the stream it was read from: GLOBAL, or the gallery whose stream it is


def decode(entries, stream: str = GLOBAL) -> list[Event]:
    """Events from XREAD/XRANGE entries ``[(id, {field: value})]`` (bytes) of one stream; a gallery's stream
    names its gallery, so its entries do not."""
    out = []
    for eid, fields in entries:
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in fields.items()}
        out.append(Event(id=eid.decode() if isinstance(eid, bytes) else eid, op=f.get("op", ""),
                         gallery=f.get("gallery", stream), ref=f.get("id", ""), stream=stream))
    return out


@dataclass(frozen=True)
class StreamInfo:
    exists: bool
    first: str | None  #: oldest entry still in the stream (None when empty)
    last: str  #: last id ever generated (ZERO for a new stream)
    length: int = 0

    def gap_after(self, pos: str, maxlen: int) -> bool:
        """Could entries after ``pos`` be missing, or is ``pos`` from another life of this stream?

        True when the stream was trimmed past ``pos`` (its oldest entry is newer), when ``pos`` is newer than
        anything the stream generated (Redis lost writes, or a snapshot of another store), or when the stream
        is gone although ``pos`` says it existed. From ``ZERO`` (a process that started on an empty log),
        entries are missing only if the stream was ever trimmed, i.e. it reached ``maxlen`` entries.
        """
        p = parse_id(pos)
        if not self.exists:
            return p != (0, 0)
        if p > parse_id(self.last):
            return True
        if self.first is None or parse_id(self.first) <= p:
            return False
        return p != (0, 0) or self.length >= maxlen


def stream_info(r: redis.Redis, key: str) -> StreamInfo:
    try:
        info = r.xinfo_stream(key)
    except redis.exceptions.ResponseError:  # no such key
        return StreamInfo(exists=False, first=None, last=ZERO)
    first = info.get("first-entry")
    first_id = first[0] if first else None
    if isinstance(first_id, bytes):
        first_id = first_id.decode()
    last = info.get("last-generated-id") or ZERO
    if isinstance(last, bytes):
        last = last.decode()
    return StreamInfo(exists=True, first=first_id, last=last, length=int(info.get("length", 0)))


def read_range(r: redis.Redis, key: str, after: str, until: str, stream: str = GLOBAL,
               count: int = 1000) -> Iterator[list[Event]]:
    """Batches of the events of one stream with ``after < id <= until``."""
    start = after
    while parse_id(start) < parse_id(until):
        entries = r.xrange(key, min=f"({start}" if start != ZERO else "-", max=until, count=count)
        if not entries:
            return
        batch = decode(entries, stream)
        yield batch
        start = batch[-1].id


class EventReader:
    """Follows every log: :meth:`read` returns the entries after the given positions, waiting up to ``block_ms`` for
    some. On one Redis server that is one blocking XREAD over all the streams (on a client of its own:
    :meth:`index.store.RedisStore.event_reader`); Redis Cluster refuses an XREAD over streams in different slots,
    so there each stream is read without blocking, all of them in one pipeline (one round trip per node), every
    ``poll_ms`` until something comes or ``block_ms`` has passed."""

    def __init__(self, r, key_of: Callable[[str], str], block_ms: int, cluster: bool = False, poll_ms: int = 50,
                 owns_client: bool = True):
        self.r, self.key_of, self.block_ms = r, key_of, block_ms
        self.cluster, self.poll_ms = cluster, poll_ms
        self.owns_client = owns_client  #: close() closes the client (not when it is the store's own)

    def read(self, positions: Mapping[str, str], count: int) -> list[Event]:
        if not positions:
            return []
        names = list(positions)
        if not self.cluster:
            got = self.r.xread({self.key_of(n): positions[n] for n in names}, count=count, block=self.block_ms)
            return self._decode(got, names)
        deadline = time.monotonic() + self.block_ms / 1000
        while True:
            pipe = self.r.pipeline(transaction=False)
            for n in names:
                pipe.xread({self.key_of(n): positions[n]}, count=count)
            got = [entry for res in pipe.execute() if res for entry in res]
            if got or time.monotonic() >= deadline:
                return self._decode(got, names)
            time.sleep(self.poll_ms / 1000)

    def _decode(self, got, names: list[str]) -> list[Event]:
        by_key = {self.key_of(n): n for n in names}
        out: list[Event] = []
        for key, entries in got or []:
            key = key.decode() if isinstance(key, bytes) else key
            out += decode(entries, by_key[key])
        return out

    def info(self, stream: str) -> StreamInfo:
        return stream_info(self.r, self.key_of(stream))

    def close(self) -> None:
        if self.owns_client:
            self.r.close()
