"""`ReidClient` (service/client.py), the public Python client: importable without the server's dependencies,
typed answers from a real service, and retries of 429/503 after Retry-After against a real (tiny) HTTP server."""

from __future__ import annotations

import email.utils
import io
import json
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from index.redis_server import free_port
from service.client import (GalleryInfo, ReidClient, SearchAnswer, SearchHit, ServiceError, ServiceUnreachable)

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = ("fastapi", "starlette", "pydantic", "onnxruntime", "numpy", "PIL", "redis", "faiss", "uvicorn",
               "service.app", "service.state", "index")


def test_imports_without_the_servers_dependencies():
    code = ("import sys, service.client as c; c.ReidClient; "
            f"print([m for m in {SERVER_ONLY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- retries, on a real HTTP server

class Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next of ``server.script``: (status, headers); 200s carry a gallery."""

    def do_GET(self):
        server = self.server
        server.times.append(time.monotonic())
        status, headers = server.script.pop(0) if server.script else (200, {})
        body = json.dumps({"name": "g", "count": 3} if status == 200 else
                          {"error": {"code": "too_many_requests", "message": "slow down"}}).encode()
        self.send_response(status)
        for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.script, server.times = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_retries_429_and_503_after_retry_after(scripted):
    url = f"http://127.0.0.1:{scripted.server_address[1]}"
    http_date = email.utils.formatdate(time.time() + 3, usegmt=True)  # the other form of Retry-After
    scripted.script = [(429, {"Retry-After": "1"}), (503, {"Retry-After": http_date}), (200, {})]
    with ReidClient(url) as client:
        assert client.gallery("g") == GalleryInfo(name="g", count=3)
    t = scripted.times
    assert len(t) == 3 and t[1] - t[0] >= 0.95 and t[2] - t[1] >= 0.9  # the date has whole seconds

    # no Retry-After: a short backoff; retries spent: the last error is raised, with its Retry-After
    scripted.times.clear()
    scripted.script = [(503, {}), (503, {"Retry-After": "0"}), (503, {"Retry-After": "0"})]
    with ReidClient(url, retries=2) as client, pytest.raises(ServiceError) as e:
        client.gallery("g")
    assert e.value.status == 503 and e.value.code == "too_many_requests" and e.value.retry_after == 0
    assert len(scripted.times) == 3 and scripted.times[1] - scripted.times[0] >= 0.45

    # asked to wait longer than the client will: raised at once, saying how long
    scripted.times.clear()
    scripted.script = [(429, {"Retry-After": "120"})]
    started = time.monotonic()
    with ReidClient(url, max_retry_wait=10) as client, pytest.raises(ServiceError) as e:
        client.gallery("g")
    assert e.value.status == 429 and e.value.retry_after == 120 and time.monotonic() - started < 5
    assert len(scripted.times) == 1

    # other errors are not retried
    scripted.times.clear()
    scripted.script = [(404, {})]
    with ReidClient(url) as client, pytest.raises(ServiceError):
        client.gallery("g")
    assert len(scripted.times) == 1


# ---------------------------------------------------------------------------- against the real service

def test_typed_answers_from_a_real_service(server_factory, image_bytes, tmp_path):
    base = server_factory(api_key="k").url
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i:04d}_c{1 + i % 2}s1_000001_00.png")
        paths[-1].write_bytes(image_bytes(i))
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    meta = [{"camera_id": str(1 + i % 2), "person_id": f"p{i // 2}"} for i in range(6)] + [{}]

    with ReidClient(base, api_key="k") as client:
        assert client.model().embedding_dim == 64
        result = client.ingest("lobby", paths + [bad], meta, batch_size=4)
        assert [it.index for it in result.items] == list(range(6)) and result.created == 6
        assert [(e.index, e.filename, e.code) for e in result.errors] == [(6, "notes.txt", "unsupported_media_type")]
        assert client.ingest("lobby", paths[:1]).items[0].status == "exists"
        info = client.gallery("lobby")
        assert info.count == 6 and info.cameras == {"1": 3, "2": 3} and info.indexed == 6
        assert [g.name for g in client.galleries()] == ["lobby"]

        answer = client.search("lobby", paths[0], top_k=3)
        assert isinstance(answer, SearchAnswer) and answer.refine == "none" and answer.candidates is None
        assert isinstance(answer.results[0], SearchHit) and answer.results[0].person_id == "p0"
        assert answer.results[0].score == pytest.approx(1.0, abs=1e-4) and "total" in answer.timing_ms
        only = client.search("lobby", image_bytes(0), top_k=5, cameras="2", refine="kreciprocal", candidates=5)
        assert {r.camera_id for r in only.results} == {"2"} and only.candidates_used == 3
        batch = client.search_batch("lobby", [paths[0], image_bytes(3)], top_k=2)
        assert [q.index for q in batch.queries] == [0, 1] and batch.queries[1].results[0].person_id == "p1"
        assert client.search_tracklet("lobby", [paths[0], paths[1]], top_k=1).results[0].person_id == "p0"

        page = client.images("lobby", offset=2, limit=3)
        assert page.total == 6 and len(page.images) == 3 and [i.id for i in page.images] == sorted(i.id for i in page.images)
        first = client.images("lobby", limit=6).images
        assert [i.id for i in first[2:5]] == [i.id for i in page.images]
        seed = next(i for i in first if i.filename == paths[0].name)
        by_bytes = [r.id for r in client.search("lobby", paths[0], top_k=3).results]
        assert by_bytes[0] == seed.id  # the image itself, then the two the stored-image search returns
        assert [r.id for r in client.search_image("lobby", seed.id, top_k=2).results] == by_bytes[1:]

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(3):
                data = image_bytes(50 + i)
                member = tarfile.TarInfo(f"garage/{i}.png")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        archive = tmp_path / "cams.tar"
        archive.write_bytes(buf.getvalue())
        job = client.wait_job(client.import_files("garage", [archive]).id, timeout=60)
        assert job.status == "succeeded" and job.finished and job.result["created"] == 3
        assert [j.id for j in client.jobs(gallery="garage", kind="import").jobs] == [job.id]

        with pytest.raises(ServiceError) as e:
            client.gallery("nowhere")
        assert (e.value.status, e.value.code) == (404, "gallery_not_found") and "nowhere" in str(e.value)
        with pytest.raises(FileNotFoundError):
            client.search("lobby", tmp_path / "missing.png")
        assert client.delete_gallery("garage") == 3

    with ReidClient(base) as client, pytest.raises(ServiceError) as e:  # no key
        client.galleries()
    assert e.value.status == 401 and e.value.code == "unauthorized"
    with ReidClient(f"http://127.0.0.1:{free_port()}") as client, pytest.raises(ServiceUnreachable) as e:
        client.galleries()
    assert "cannot reach the service" in str(e.value)
