"""The records of background jobs and their per-kind locks, in Redis (:mod:`service.jobs` runs the jobs).

Keys (all with the hash tag ``{global}``, so a job's record, lock and listings change together in one transaction
on Redis Cluster too; ``{id}`` below is the job's id, not a tag)::

    reid:{global}:job:{id}               HASH    kind, gallery, status, progress 0..1, stage, message, params and result
                                        (JSON), created_at/updated_at, heartbeat, owner (the process running it);
                                        expires a week after it finished
    reid:{global}:jobs:lock:{kind}       STRING  the id of the job of that kind that runs, with a TTL its heartbeat renews
    reid:{global}:jobs:active            SET     the ids of the jobs queued or running (a starting process finds there the
                                        ones its crashed predecessor left)
    reid:{global}:jobs:created           ZSET    every job's id scored by its creation time (GET /v1/jobs lists from it;
                                        ids whose record expired are dropped as a listing meets them)

A record is updated only while its job is queued or running (in Lua), so a finished status is never
overwritten (its ``result`` alone may still be set: the work's last counts, after a cancel); a record whose
owner stopped heartbeating reads as failed.
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
#: the global keys' prefix (index.store's GLOBAL_PREFIX; not imported: the store imports this module)
PREFIX = "reid:{global}:"
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")

# HSET the fields only while the job is still queued or running: 1 done, 0 finished already, -1 unknown.
_UPDATE_IF_ACTIVE = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return -1 end
if s ~= 'queued' and s ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
# HSET the result of a job that still has a record (finished or not): its last counts, after a cancel.
_SET_RESULT_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'result', ARGV[1], 'updated_at', ARGV[2])
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
        self._set_result = r.register_script(_SET_RESULT_IF_EXISTS)

    @staticmethod
    def k_job(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    @staticmethod
    def k_lock(kind: str) -> str:
        return f"{PREFIX}jobs:lock:{kind}"

    K_ACTIVE = PREFIX + "jobs:active"
    K_CREATED = PREFIX + "jobs:created"

    def create(self, job_id: str, kind: str, gallery: str | None, params: dict[str, Any], owner: str = "") -> None:
        now = _now()
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k_job(job_id), mapping={
            "id": job_id, "kind": kind, "gallery": gallery or "", "status": "queued", "progress": "0",
            "stage": "", "message": "", "params": json.dumps(params), "result": "null",
            "created_at": now, "updated_at": now, "heartbeat": repr(time.time()), "owner": owner})
        pipe.sadd(self.K_ACTIVE, job_id)
        pipe.zadd(self.K_CREATED, {job_id: time.time()})
        pipe.execute()

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
        """Move an active job to a final status (no-op if it already has one). Without ``result`` the last one
        reported stays."""
        if result is not None:
            fields["result"] = result
        done = self.update(job_id, status=status, message=message, **fields)
        if done:
            pipe = self.r.pipeline(transaction=True)
            pipe.expire(self.k_job(job_id), FINISHED_TTL_S)
            pipe.srem(self.K_ACTIVE, job_id)
            pipe.execute()
        return done

    def set_result(self, job_id: str, result: dict[str, Any]) -> bool:
        """Set the result even of a finished job (the work's last counts once it has stopped after a cancel)."""
        return int(self._set_result(keys=[self.k_job(job_id)], args=[json.dumps(result), _now()])) == 1

    def active(self) -> list[dict[str, str]]:
        """``{"id", "kind", "owner"}`` of every job still queued or running; forgets the ids of finished or
        expired ones."""
        out, gone = [], []
        for raw_id in self.r.smembers(self.K_ACTIVE):
            job_id = _s(raw_id)
            kind, status, owner = (_s(v) for v in self.r.hmget(self.k_job(job_id), "kind", "status", "owner"))
            if status in ACTIVE:
                out.append({"id": job_id, "kind": kind, "owner": owner or ""})
            else:
                gone.append(job_id)
        if gone:
            self.r.srem(self.K_ACTIVE, *gone)
        return out

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

    def list(self, gallery: str | None = None, kind: str | None = None, status: str | None = None,
             limit: int = 50, cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Jobs newest first that match every filter given, at most ``limit`` of them, and the cursor of the next
        page (None on the last). A cursor is ``{creation score}:{id}`` of the last job of a page, so a page stays
        right while jobs are created or expire. ValueError for a malformed cursor."""
        top, after = "+inf", None
        if cursor is not None:
            score, _, job_id = cursor.partition(":")
            if not JOB_ID_RE.match(job_id):
                raise ValueError(f"invalid cursor {cursor!r}")
            top, after = repr(float(score)), (float(score), job_id)
        out: list[dict[str, Any]] = []
        last: tuple[float, str] | None = None
        chunk = max(2 * limit, 100)
        # Walk down by (score, id), not by offset, so that jobs created or expiring meanwhile shift nothing.
        while len(out) <= limit:
            rows = [(score, _s(raw_id)) for raw_id, score in
                    self.r.zrevrangebyscore(self.K_CREATED, top, "-inf", start=0, num=chunk, withscores=True)]
            # ties in score come in reverse id order: those down to `after` were read already
            fresh = [(score, job_id) for score, job_id in rows
                     if after is None or score < after[0] or job_id < after[1]]
            for score, job_id in fresh:
                job = self.get(job_id)
                if job is None:  # expired
                    self.r.zrem(self.K_CREATED, job_id)
                elif ((gallery is None or job["gallery"] == gallery) and (kind is None or job["kind"] == kind)
                      and (status is None or job["status"] == status)):
                    out.append(job)
                    if len(out) == limit:
                        last = (score, job_id)
                    if len(out) > limit:
                        break
            if len(rows) < chunk:
                break
            if fresh:
                top, after = repr(fresh[-1][0]), fresh[-1]
            else:
                chunk *= 2  # a whole chunk of equal scores already read: look further
        if len(out) <= limit:
            return out, None
        return out[:limit], f"{last[0]!r}:{last[1]}"
