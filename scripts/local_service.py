"""`reid serve` on embedded defaults (its own redis-server, the bundled model) as a subprocess of a command that
drives it over HTTP: the demo and the adaptation walkthrough."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from index.redis_server import free_port


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@contextmanager
def local_service(data_dir: Path, port: int, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yields (base URL, server process); `port` is replaced by a free one if busy. `env` adds settings
    (REID_*); an outside REID_REDIS_URL is dropped, so the server starts its own redis-server under
    `data_dir`. Stopped with SIGINT on exit, so the embedded redis-server is shut down too."""
    if not port_is_free(port):
        new_port = free_port()
        print(f"port {port} is busy: using {new_port}")
        port = new_port
    server_env = {**os.environ, "REID_DATA_DIR": str(data_dir), **(env or {})}
    server_env.pop("REID_REDIS_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "scripts.cli", "serve", "--host", "127.0.0.1", "--port",
                               str(port), "--log-level", "warning"], env=server_env)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
