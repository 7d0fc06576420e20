"""The change log ``reid:events``: a Redis stream written by the store in the same transaction as each change.

Each entry is ``op`` (put | delete | drop | activate), ``gallery`` and ``id`` (the image id; for
``activate`` the bundle id). Replicas follow it to keep their FAISS indexes current; a snapshot
records the last entry it reflects. Stream ids are ``<ms>-<seq>`` and are compared as integer pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import redis

__all__ = ["Event", "EventReader", "StreamInfo", "ZERO", "decode", "parse_id", "read_range", "stream_info"]

ZERO = "0-0"


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
    ref: str  #: image id (decimal) for put/delete, bundle id for activate, "" for drop


def decode(entries) -> list[Event]:
    """Events from XREAD/XRANGE entries ``[(id, {field: value})]`` (bytes)."""
    out = []
    for eid, fields in entries:
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in fields.items()}
        out.append(Event(id=eid.decode() if isinstance(eid, bytes) else eid, op=f.get("op", ""),
                         gallery=f.get("gallery", ""), ref=f.get("id", "")))
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


def read_range(r: redis.Redis, key: str, after: str, until: str, count: int = 1000) -> Iterator[list[Event]]:
    """Batches of the events with ``after < id <= until``."""
    start = after
    while parse_id(start) < parse_id(until):
        entries = r.xrange(key, min=f"({start}" if start != ZERO else "-", max=until, count=count)
        if not entries:
            return
        batch = decode(entries)
        yield batch
        start = batch[-1].id


class EventReader:
    """Follows the log: :meth:`read` waits up to ``block_ms`` for the entries after a position (a blocking XREAD,
    on a client of its own: :meth:`index.store.RedisStore.event_reader`)."""

    def __init__(self, r: redis.Redis, key: str, block_ms: int):
        self.r, self.key, self.block_ms = r, key, block_ms

    def read(self, after: str, count: int) -> list[Event]:
        got = self.r.xread({self.key: after}, count=count, block=self.block_ms)
        return decode(got[0][1]) if got else []

    def info(self) -> StreamInfo:
        return stream_info(self.r, self.key)

    def close(self) -> None:
        self.r.close()
