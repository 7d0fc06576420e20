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
* a record whose owner stopped heartbeating is reported ``failed`` when read; at start-up a process fails at once
  the jobs that a dead process of the same host left running (a crash, SIGKILL, the OOM killer) and frees their
  kinds, so the next job need not wait for the lock to expire.
* a job that stops (cancelled, failed, orphaned) keeps the last ``result`` its work reported (an import's counts).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import redis

from index.job_store import ACTIVE, JobStore

log = logging.getLogger("reid.service")

HEARTBEAT_S = 2.0


class JobCancelled(Exception):
    """Raised inside the work when the job was cancelled."""


class JobFailed(Exception):
    """Raised by the work with the message the record should show."""


def _start_ticks(pid: int | str) -> str | None:
    """When the process started (clock ticks after boot, /proc): with the pid, it names one process even where pids
    are reused (a restarted container's service is pid 1 again). None where there is no such process or no /proc."""
    try:  # the fields after the command name, which may hold spaces and parentheses
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def process_identity() -> str:
    """``host:pid:start`` of this process: the ``owner`` of the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks('self') or ''}"


def _dead_here(owner: str, host: str) -> bool:
    """Whether ``owner`` (:func:`process_identity`) was a process of this host that no longer runs. Unknown (another
    host, no /proc): False, and the heartbeat rule applies."""
    o_host, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    if o_host != host or not pid.isdigit() or not start or not os.path.isdir("/proc/self"):
        return False
    return _start_ticks(pid) != start


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
    #: the work's latest result (it may keep updating the dict): kept by the record if the job stops early
    result: dict[str, Any] | None = None
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

    def __init__(self, store: JobStore, owner: str | None = None):
        self.store = store
        self.owner = owner or process_identity()
        self._local: dict[str, tuple[JobContext, threading.Thread]] = {}
        self._lock = threading.Lock()

    def fail_orphans(self) -> list[str]:
        """At start-up: fail the jobs that a dead process of this host left queued or running, keeping their last
        result, and free their kinds now rather than when the locks expire. Returns their ids."""
        host = self.owner.partition(":")[0]
        failed = []
        for job in self.store.active():
            if job["owner"] != self.owner and _dead_here(job["owner"], host):
                if self.store.finish(job["id"], "failed", "the service process running this job stopped (it crashed "
                                                          "or was killed); the result holds its last counts"):
                    log.warning("job %s (%s) was left running by a process that died: marked failed", job["id"],
                                job["kind"])
                    failed.append(job["id"])
                self.store.release(job["kind"], job["id"])
        return failed

    def _lock_is_stale(self, holder: str) -> bool:
        """The lock names a job that has finished (or, unheard for too long, reads as failed now). A holder without a
        record may be a job being created: not stale."""
        job = self.store.get(holder)
        return job is not None and job["status"] not in ACTIVE

    def start(self, kind: str, gallery: str | None, params: dict[str, Any],
              work: Callable[[JobContext], dict[str, Any]]) -> dict[str, Any]:
        """Record a job and run ``work(ctx) -> result`` in a thread. Raises :class:`JobBusy`."""
        job_id = uuid.uuid4().hex
        holder = self.store.claim(kind, job_id)
        if holder is not None and self._lock_is_stale(holder):
            self.store.release(kind, holder)  # only if it still names that job
            holder = self.store.claim(kind, job_id)
        if holder is not None:
            raise JobBusy(kind, holder)
        try:
            self.store.create(job_id, kind, gallery, params, owner=self.owner)
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
            self._stop(ctx, "cancelled", "cancelled")
        except JobFailed as e:
            self._stop(ctx, "failed", str(e))
        except Exception as e:
            log.exception("job %s (%s) failed", ctx.id, ctx.kind)
            self._stop(ctx, "failed", f"{type(e).__name__}: {e}")
        finally:
            ctx.done.set()
            if beat.is_alive():
                beat.join(timeout=HEARTBEAT_S + 5)
            self.store.release(ctx.kind, ctx.id)
            with self._lock:
                self._local.pop(ctx.id, None)

    def _stop(self, ctx: JobContext, status: str, message: str) -> None:
        """Finish the record with the work's last result. A cancel marked the record before the work stopped: the
        result, counted until it stopped, is recorded all the same."""
        if not self.store.finish(ctx.id, status, message, ctx.result) and ctx.result is not None:
            self.store.set_result(ctx.id, ctx.result)

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
