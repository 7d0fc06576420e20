"""Background jobs (adapting a model, activating one; later bulk ingests) with their record in Redis.

The record is the hash ``reid:job:{id}`` (kind, gallery, status, progress 0..1, stage, message, params
and result as JSON, created_at/updated_at; :mod:`index.job_store`), so any replica can answer
``GET /v1/jobs/{id}``. The work
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

import logging
import os
import signal
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import redis

from index.job_store import JobStore

log = logging.getLogger("reid.service")

HEARTBEAT_S = 2.0


class JobCancelled(Exception):
    """Raised inside the work when the job was cancelled."""


class JobFailed(Exception):
    """Raised by the work with the message the record should show."""


class JobBusy(Exception):
    def __init__(self, kind: str, holder: str | None):
        super().__init__(f"a {kind} job is already running" + (f" (job {holder})" if holder else ""))
        self.holder = holder


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

    def commit_guard(self) -> tuple[list[str], Callable[[Any], None]]:
        """``watch`` and ``precondition`` for a store transaction that must commit only while this job runs: a cancel
        (from any replica) aborts it with :class:`JobCancelled`."""
        keys, running = self.store.watch_running(self.id)

        def precondition(pipe) -> None:
            if not running(pipe):
                raise JobCancelled()

        return keys, precondition

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
