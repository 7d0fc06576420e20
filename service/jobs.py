"""Background jobs (adapting a model, activating one; later bulk ingests) with their record in Redis.

The record is the hash ``reid:job:{id}`` (kind, gallery, status, progress 0..1, stage, message, params
and result as JSON, created_at/updated_at), so any replica can answer ``GET /v1/jobs/{id}``. The work
runs in a thread of the replica that accepted it (:class:`JobManager`), which heartbeats the record.

* status: ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``; a finished status is
  never overwritten (updates are conditional, in Lua), so a cancel cannot be undone by a late update.
* one job per kind at a time, across replicas: ``reid:jobs:lock:{kind}`` holds the job id, with a TTL
  the heartbeat renews, so a replica that dies frees it.
* a cancel (from any replica) marks the record ``cancelled``; the owner notices at once if it is the
  same replica, else at its next heartbeat, and stops the work (killing its subprocess).
* a record whose owner stopped heartbeating is reported ``failed`` when read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import redis

log = logging.getLogger("reid.service")

ACTIVE = ("queued", "running")
HEARTBEAT_S = 2.0
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


class JobCancelled(Exception):
    """Raised inside the work when the job was cancelled."""


class JobFailed(Exception):
    """Raised by the work with the message the record should show."""


class JobBusy(Exception):
    def __init__(self, kind: str, holder: str | None):
        super().__init__(f"a {kind} job is already running" + (f" (job {holder})" if holder else ""))
        self.holder = holder


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


@dataclass
class JobContext:
    """What the work sees: report progress, check for cancellation, attach a subprocess to kill."""

    id: str
    kind: str
    store: JobStore
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    _proc: subprocess.Popen | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def key(self) -> str:
        return self.store.k_job(self.id)

    def progress(self, fraction: float | None = None, stage: str | None = None, message: str | None = None) -> None:
        fields: dict[str, Any] = {}
        if fraction is not None:
            fields["progress"] = round(min(1.0, max(0.0, float(fraction))), 4)
        if stage is not None:
            fields["stage"] = stage
        if message is not None:
            fields["message"] = message
        if not self.store.update(self.id, **fields):
            self.cancel()  # cancelled (or failed as stale) meanwhile
        self.check()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled()

    def attach(self, proc: subprocess.Popen) -> None:
        """The work's subprocess; it must run in its own session (it is killed as a process group)."""
        with self._lock:
            self._proc = proc
        if self.cancelled.is_set():
            self.kill()

    def cancel(self) -> None:
        self.cancelled.set()
        self.kill()

    def kill(self) -> None:
        """Kill the attached subprocess (and its children), if it still runs."""
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is it and its children
            except ProcessLookupError:
                pass


class JobManager:
    """Runs jobs in threads of this replica and cancels them."""

    def __init__(self, store: JobStore):
        self.store = store
        self._local: dict[str, tuple[JobContext, threading.Thread]] = {}
        self._lock = threading.Lock()

    def start(self, kind: str, gallery: str | None, params: dict[str, Any],
              work: Callable[[JobContext], dict[str, Any]]) -> dict[str, Any]:
        """Record a job and run ``work(ctx) -> result`` in a thread. Raises :class:`JobBusy`."""
        job_id = uuid.uuid4().hex
        holder = self.store.claim(kind, job_id)
        if holder is not None:
            raise JobBusy(kind, holder)
        try:
            self.store.create(job_id, kind, gallery, params)
            ctx = JobContext(job_id, kind, self.store)
            thread = threading.Thread(target=self._run, args=(ctx, work), name=f"job-{kind}-{job_id[:8]}",
                                      daemon=True)
            with self._lock:
                self._local[job_id] = (ctx, thread)
            thread.start()
        except BaseException:
            self.store.release(kind, job_id)
            raise
        return self.store.get(job_id)

    def _run(self, ctx: JobContext, work: Callable[[JobContext], dict[str, Any]]) -> None:
        beat = threading.Thread(target=self._heartbeat, args=(ctx,), name=f"job-heartbeat-{ctx.id[:8]}", daemon=True)
        try:
            if not self.store.update(ctx.id, status="running"):
                raise JobCancelled()
            beat.start()
            result = work(ctx)
            self.store.finish(ctx.id, "succeeded", "done", result, progress=1.0)
        except JobCancelled:
            self.store.finish(ctx.id, "cancelled", "cancelled")
        except JobFailed as e:
            self.store.finish(ctx.id, "failed", str(e))
        except Exception as e:
            log.exception("job %s (%s) failed", ctx.id, ctx.kind)
            self.store.finish(ctx.id, "failed", f"{type(e).__name__}: {e}")
        finally:
            ctx.done.set()
            if beat.is_alive():
                beat.join(timeout=HEARTBEAT_S + 5)
            self.store.release(ctx.kind, ctx.id)
            with self._lock:
                self._local.pop(ctx.id, None)

    def _heartbeat(self, ctx: JobContext) -> None:
        while not ctx.done.wait(HEARTBEAT_S):
            try:
                self.store.renew(ctx.kind, ctx.id)
                if not self.store.update(ctx.id):
                    ctx.cancel()  # cancelled by a request to another replica
            except redis.RedisError as e:  # keep beating: Redis may come back
                log.warning("job %s heartbeat: %s", ctx.id, e)

    def cancel(self, job_id: str, wait_s: float = 15.0) -> bool:
        """Mark an active job cancelled and stop it here if it runs here. False if it was not active."""
        if not self.store.finish(job_id, "cancelled", "cancelled by request"):
            return False
        with self._lock:
            local = self._local.get(job_id)
        if local is not None:
            ctx, thread = local
            ctx.cancel()
            thread.join(timeout=wait_s)  # so that its lock is free and its files are gone when we answer
        return True

    def shutdown(self, wait_s: float = 15.0) -> None:
        with self._lock:
            local = list(self._local.values())
        for ctx, _ in local:
            self.store.finish(ctx.id, "failed", "the service stopped while the job was running")
            ctx.cancel()
        for _, thread in local:
            thread.join(timeout=wait_s)
