"""Is an acknowledged write on disk? Probe a Redis server's persistence once; wait for the AOF fsync.

The service answers 2xx for an image only after its MULTI/EXEC. Redis write()s its append-only file
before it answers, so with AOF on, a crash of the redis-server *process* loses nothing; a crash of its
*host* (power, kernel) loses what the OS had not yet written to disk, unless the server fsyncs before
answering (``appendfsync always``) or the client waits for that fsync with ``WAITAOF 1 0 <ms>`` (Redis >=
7.2), which is what :class:`DurablePipeline` does when the server runs ``appendfsync everysec`` or ``no``.

:func:`probe` reads ``CONFIG GET appendonly/appendfsync`` (tolerating a server where CONFIG is
disabled, as on managed Redis) and says whether writes will be durable, whether to use WAITAOF, and
what to warn about.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import redis
from redis.client import Pipeline
from redis.cluster import ClusterPipeline, RedisCluster, TransactionStrategy

__all__ = ["DurablePipeline", "NotDurable", "Persistence", "WriteWait", "durable_pipeline", "probe",
           "wait_after_write"]

#: the two durability levels the service can be asked for (REID_REDIS_APPENDFSYNC)
LEVELS = ("always", "everysec")


class NotDurable(redis.exceptions.RedisError):
    """WAITAOF gave up: the write is applied in Redis but was not fsynced to its AOF in time.

    Deliberately not a ConnectionError/TimeoutError: redis-py would retry (re-run) the transaction.
    """


@dataclass(frozen=True)
class Persistence:
    version: str | None
    appendonly: str | None  #: "yes"/"no"; None when CONFIG is disabled
    appendfsync: str | None  #: always/everysec/no; None when CONFIG is disabled
    has_waitaof: bool  #: the server knows WAITAOF (Redis >= 7.2)
    use_waitaof: bool  #: writes wait for the local AOF fsync with WAITAOF
    durable: bool | None  #: every acknowledged write survives a crash of Redis (None: cannot tell)
    required: str  #: what the service was asked for (REID_REDIS_APPENDFSYNC)
    warning: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _version(r: redis.Redis) -> str | None:
    try:
        return str(r.info("server").get("redis_version"))
    except redis.exceptions.ResponseError:  # INFO renamed/disabled
        return None


def _config(r: redis.Redis, name: str) -> str | None:
    try:
        got = r.config_get(name)
    except redis.exceptions.ResponseError:  # CONFIG renamed or disabled (managed Redis, ACLs)
        return None
    v = got.get(name) if isinstance(got, dict) else None
    if v is None:
        v = got.get(name.encode()) if isinstance(got, dict) else None
    return v.decode() if isinstance(v, bytes) else v


def _waitaof(r: redis.Redis, numlocal: int) -> bool | None:
    """True: WAITAOF works; False: the server has it but AOF is off; None: no such command."""
    try:
        r.execute_command("WAITAOF", numlocal, 0, 100)
        return True
    except redis.exceptions.ResponseError as e:
        msg = str(e).lower()
        if "unknown command" in msg or "unknown subcommand" in msg:
            return None
        return False  # "WAITAOF cannot be used when numlocal is set but appendonly is disabled"


def probe(r: redis.Redis, required: str = "always") -> Persistence:
    """Read the server's persistence once and decide how writes are made durable."""
    if required not in LEVELS:
        raise ValueError(f"required durability must be one of {LEVELS}, got {required!r}")
    version = _version(r)
    appendonly, appendfsync = _config(r, "appendonly"), _config(r, "appendfsync")
    has_waitaof = _waitaof(r, 0) is True
    use_waitaof, durable, warning = False, None, None
    fix = "run Redis with `appendonly yes` and `appendfsync always` (or Redis >= 7.2, which has WAITAOF)"
    if appendonly == "no":
        durable = False
        warning = (f"Redis runs without an append-only file (appendonly no): acknowledged images are lost if "
                   f"Redis crashes or restarts before its next RDB save; {fix}")
    elif appendonly == "yes" and appendfsync == "always":
        durable = True
    elif required == "everysec":
        durable = False
        warning = (f"REID_REDIS_APPENDFSYNC=everysec and Redis runs appendfsync {appendfsync or 'unknown'}: "
                   "images acknowledged in the last ~1 s (up to 2 s) before a crash of the host (power loss, "
                   "kernel panic) can be lost; a crash of the redis-server process alone loses none")
    elif has_waitaof and (appendonly == "yes" or (appendonly is None and _waitaof(r, 1))):
        use_waitaof, durable = True, True  # WAITAOF 1 0 after every write transaction
    elif appendonly is None:
        warning = ("cannot read Redis's persistence settings (CONFIG is disabled) and the server has no WAITAOF: "
                   "acknowledged images are durable only if it runs appendonly yes + appendfsync always")
    else:
        durable = False
        window = "~1 s" if appendfsync == "everysec" else "~30 s (the OS decides)"
        warning = (f"Redis {version or ''} runs appendfsync {appendfsync} and has no WAITAOF: images acknowledged "
                   f"in the last {window} before a crash of its host (power loss, kernel panic) can be lost; {fix}")
    return Persistence(version=version, appendonly=appendonly, appendfsync=appendfsync, has_waitaof=has_waitaof,
                       use_waitaof=use_waitaof, durable=durable, required=required, warning=warning)


@dataclass(frozen=True)
class WriteWait:
    """What a write transaction waits for before it returns (on its own connection, right after EXEC)."""

    aof_ms: int | None = None  #: WAITAOF 1 0 <aof_ms>: the local AOF fsync (None: the server's policy is enough)
    replicas: int = 0  #: WAIT <replicas> <replicas_ms>: that many replicas hold the write (0: none needed)
    replicas_ms: int = 2000

    def __bool__(self) -> bool:
        return self.aof_ms is not None or self.replicas > 0


def wait_after_write(connection, wait: WriteWait) -> None:
    """Send the waits on ``connection`` (the one that ran the transaction: WAITAOF and WAIT cover only the writes of
    the connection that sends them, so neither can be a separate call through a pool). Raises :class:`NotDurable`."""
    if wait.aof_ms is not None:
        connection.send_command("WAITAOF", 1, 0, wait.aof_ms)
        try:
            local, _ = connection.read_response()
        except redis.exceptions.ResponseError as e:
            raise NotDurable(f"WAITAOF failed after the write: {e}") from e
        if int(local) < 1:
            raise NotDurable(f"Redis did not fsync the write to its AOF within {wait.aof_ms} ms")
    if wait.replicas:
        connection.send_command("WAIT", wait.replicas, wait.replicas_ms)
        acked = int(connection.read_response())
        if acked < wait.replicas:
            raise NotDurable(f"only {acked} of {wait.replicas} replica(s) acknowledged the write within "
                             f"{wait.replicas_ms} ms (a failover now could lose it)")


class DurablePipeline(Pipeline):
    """A MULTI/EXEC pipeline on one Redis server followed, on the same connection, by :func:`wait_after_write`."""

    def __init__(self, client: redis.Redis, wait: WriteWait):
        super().__init__(client.connection_pool, client.response_callbacks, True, None)
        self.wait = wait

    def _execute_transaction(self, connection, commands, raise_on_error):
        data = super()._execute_transaction(connection, commands, raise_on_error)
        wait_after_write(connection, self.wait)
        return data


class _DurableTransactionStrategy(TransactionStrategy):
    """Redis Cluster's MULTI/EXEC (on the node of the transaction's slot) followed by :func:`wait_after_write` on
    the connection it ran on, which the strategy holds until the pipeline is reset."""

    def __init__(self, pipe: ClusterPipeline, wait: WriteWait):
        super().__init__(pipe)
        self.wait = wait

    def _execute_transaction(self, stack, raise_on_error):
        data = super()._execute_transaction(stack, raise_on_error)
        wait_after_write(self._transaction_connection, self.wait)
        return data


def durable_pipeline(client: redis.Redis | RedisCluster, wait: WriteWait):
    """A transaction pipeline on ``client`` (one server or a cluster) that waits as ``wait`` says after EXEC."""
    pipe = client.pipeline(transaction=True)
    if not wait:
        return pipe
    if isinstance(client, RedisCluster):
        pipe._execution_strategy = _DurableTransactionStrategy(pipe, wait)  # redis-py has no public hook for it
        return pipe
    return DurablePipeline(client, wait)
