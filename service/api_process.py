"""The API as a real OS process (``python -m scripts.cli serve``) that can be SIGKILLed, and helpers around it.

The API's counterpart of `index/redis_server.py`: the benchmark (restart, ingest, load and HTTP search
sections) and the crash, replica and restart tests both drive the service through it, so it lives with the
service rather than in either of them. Settings go in through the environment (``REID_*``), as in
production; the process log is kept in a file to read back.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from index.redis_server import STATE_FILE, free_port

ROOT = Path(__file__).resolve().parents[1]  # the repository (or site-packages): where scripts/ is


class ApiProcess:
    def __init__(self, data_dir: Path, model_dir: Path, redis_url: str | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, log_path: Path | None = None):
        self.data_dir, self.model_dir, self.redis_url = Path(data_dir), Path(model_dir), redis_url
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env or {}
        self.log_path = Path(log_path or self.data_dir.parent / f"api-{self.port}.log")
        self.proc: subprocess.Popen | None = None
        self.started_at = self.ready_after = None

    def start(self, timeout: float = 120.0, ready: bool = True) -> "ApiProcess":
        """Start; wait for ``/readyz`` 200 (``ready``) or just for ``/healthz`` answering."""
        env = {**os.environ, "REID_ORT_THREADS": "1", "REID_DATA_DIR": str(self.data_dir),
               "REID_MODEL_DIR": str(self.model_dir), **self.env}
        env.pop("REID_REDIS_URL", None)
        if self.redis_url:
            env["REID_REDIS_URL"] = self.redis_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "scripts.cli", "serve", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--log-level", "info"],
                                     cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        path = "/readyz" if ready else "/healthz"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"API exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"API not {'ready' if ready else 'up'} after {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        self.ready_after = time.monotonic() - self.started_at
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (no snapshot, the embedded redis-server is left behind)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM: uvicorn shuts down cleanly (snapshots written, embedded Redis stopped)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def redis_pid(self) -> int | None:
        """Pid of the embedded redis-server this API started (from its state file)."""
        try:
            return int(json.loads((self.data_dir / "redis" / STATE_FILE).read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    def memory_kb(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak) of the process, in kB, from /proc."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(val.split()[0])
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process and its children (the embedded redis-server), from /proc."""
        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(int(p.name)) == self.pid]
        return sum(_cpu_seconds(pid) for pid in [self.pid, *children])

    def metric(self, name: str) -> float | None:
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def metric_samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """``(labels, value)`` of each sample of a metric in ``/metrics``."""
        out = []
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + "{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}")]))
                out.append((labels, float(line.rsplit(" ", 1)[1])))
        return out

    def metric_labels(self, name: str) -> dict[str, float]:
        """``{first label's value: value}`` of a metric (e.g. reid_index_vectors per gallery)."""
        return {next(iter(labels.values())): v for labels, v in self.metric_samples(name)}

    def __enter__(self) -> "ApiProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _stat_fields(pid: int) -> list[str]:
    try:  # after the command name, which may hold spaces and parentheses
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def _cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)  # utime and stime are the stat file's fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def pid_alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"  # a zombie has exited


def noise_images(n: int, seed: int, size: tuple[int, int] = (32, 64)) -> list[bytes]:
    """``n`` distinct small PNGs: a random base colour plus noise (distinct embeddings even for a tiny model)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, 3)
        arr = np.clip(base + rng.normal(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def upload(url: str, gallery: str, blobs: list[tuple[str, bytes]], timeout: float = 60.0) -> httpx.Response:
    return httpx.post(f"{url}/v1/galleries/{gallery}/images", files=[("files", (n, b, "image/png")) for n, b in blobs],
                      timeout=timeout)


def top1(url: str, gallery: str, images: list[bytes], batch: int = 32) -> list[int | None]:
    """The first result's id for each query image (batched search)."""
    out: list[int | None] = []
    for i in range(0, len(images), batch):
        part = images[i:i + batch]
        r = httpx.post(f"{url}/v1/galleries/{gallery}/search:batch", data={"top_k": "1", "refine": "none"},
                       files=[("files", (f"q{j}.png", b, "image/png")) for j, b in enumerate(part)], timeout=120)
        if r.status_code != 200:
            raise RuntimeError(f"search:batch on {gallery!r} answered {r.status_code}: {r.text}")
        out.extend(q["results"][0]["id"] if q["results"] else None for q in r.json()["queries"])
    return out


def gallery_count(url: str, gallery: str) -> int:
    r = httpx.get(f"{url}/v1/galleries/{gallery}", timeout=30)
    return r.json()["count"] if r.status_code == 200 else 0
