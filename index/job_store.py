"""The records of background jobs and their per-kind locks, in Redis (:mod:`service.jobs` runs the jobs).

Keys::

    reid:job:{id}               HASH    kind, gallery, status, progress 0..1, stage, message, params and result
                                        (JSON), created_at/updated_at, heartbeat; expires a week after it finished
    reid:jobs:lock:{kind}       STRING  the id of the job of that kind that runs, with a TTL its heartbeat renews

A record is updated only while its job is queued or running (in Lua), so a finished status is never
overwritten; a record whose owner stopped heartbeating reads as failed.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable

import redis

__all__ = ["ACTIVE", "JOB_ID_RE", "LOCK_TTL_S", "STALE_AFTER_S", "JobStore"]

ACTIVE = ("queued", "running")
LOCK_TTL_S = 30
STALE_AFTER_S = 60.0
FINISHED_TTL_S = 7 * 24 * 3600  # finished records expire after a week
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")

# HSET the fields only while the job is still queued or running: 1 done, 0 finished already, -1 unknown.
_UPDATE_IF_ACTIVE = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return -1 end
if s ~= 'queued' and s ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
_RELEASE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _s(v: Any) -> str | None:
    return v.decode("utf-8") if isinstance(v, bytes) else v


class JobStore:
    """The job records and per-kind locks in Redis."""

    def __init__(self, r: redis.Redis):
        self.r = r
        self._update = r.register_script(_UPDATE_IF_ACTIVE)
        self._release = r.register_script(_RELEASE_IF_OWNER)

    @staticmethod
    def k_job(job_id: str) -> str:
        return f"reid:job:{job_id}"

    @staticmethod
    def k_lock(kind: str) -> str:
        return f"reid:jobs:lock:{kind}"

    def create(self, job_id: str, kind: str, gallery: str | None, params: dict[str, Any]) -> None:
        now = _now()
        self.r.hset(self.k_job(job_id), mapping={
            "id": job_id, "kind": kind, "gallery": gallery or "", "status": "queued", "progress": "0",
            "stage": "", "message": "", "params": json.dumps(params), "result": "null",
            "created_at": now, "updated_at": now, "heartbeat": repr(time.time())})

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job as the API shows it, or None. A job whose owner went silent is failed here."""
        if not JOB_ID_RE.match(job_id or ""):
            return None
        raw = {_s(k): _s(v) for k, v in self.r.hgetall(self.k_job(job_id)).items()}
        if not raw:
            return None
        if raw["status"] in ACTIVE and time.time() - float(raw.get("heartbeat") or 0) > STALE_AFTER_S:
            self.finish(job_id, "failed", f"the replica running this job stopped responding "
                                          f"(no heartbeat for {STALE_AFTER_S:.0f} s)")
            return self.get(job_id)
        return {
            "id": raw["id"], "kind": raw["kind"], "gallery": raw.get("gallery") or None,
            "status": raw["status"], "progress": float(raw.get("progress") or 0.0),
            "stage": raw.get("stage") or None, "message": raw.get("message") or None,
            "params": json.loads(raw.get("params") or "{}"), "result": json.loads(raw.get("result") or "null"),
            "created_at": raw["created_at"], "updated_at": raw["updated_at"],
        }

    def update(self, job_id: str, **fields: Any) -> bool:
        """Set fields (and the heartbeat) if the job is still active. Returns whether it was."""
        fields = {k: (json.dumps(v) if k in ("params", "result") else "" if v is None else str(v))
                  for k, v in fields.items()}
        if fields:  # a bare heartbeat leaves updated_at alone
            fields["updated_at"] = _now()
        fields["heartbeat"] = repr(time.time())
        args = [x for kv in fields.items() for x in kv]
        return int(self._update(keys=[self.k_job(job_id)], args=args)) == 1

    def finish(self, job_id: str, status: str, message: str | None = None,
               result: dict[str, Any] | None = None, **fields: Any) -> bool:
        """Move an active job to a final status (no-op if it already has one)."""
        done = self.update(job_id, status=status, message=message, result=result, **fields)
        if done:
            self.r.expire(self.k_job(job_id), FINISHED_TTL_S)
        return done

    def claim(self, kind: str, job_id: str) -> str | None:
        """Take the ``kind`` lock for ``job_id``; returns None, or the id of the job holding it."""
        if self.r.set(self.k_lock(kind), job_id, nx=True, ex=LOCK_TTL_S):
            return None
        return _s(self.r.get(self.k_lock(kind))) or "unknown"

    def renew(self, kind: str, job_id: str) -> None:
        # Only our own lock (a lock that expired and was taken by another job stays theirs).
        if _s(self.r.get(self.k_lock(kind))) == job_id:
            self.r.expire(self.k_lock(kind), LOCK_TTL_S)

    def release(self, kind: str, job_id: str) -> None:
        self._release(keys=[self.k_lock(kind)], args=[job_id])

    def watch_running(self, job_id: str) -> tuple[list[str], Callable[[Any], bool]]:
        """For a store transaction that may commit only while the job runs (``watch`` and ``precondition`` of
        :meth:`index.store.RedisStore.commit_staged`): the keys to WATCH, and a test of the job's status to call
        with the transaction's pipeline (a cancel from any replica before EXEC makes it run again)."""
        key = self.k_job(job_id)
        return [key], lambda pipe: _s(pipe.hget(key, "status")) == "running"
