"""Jobs, model bundles, activation and adaptation over HTTP: real uvicorn, real redis-server, real ONNX Runtime.

The adaptation test runs the real `reid adapt` subprocess (it needs torch); everything else runs on a
serving install.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from conftest import write_tiny_bundle
from index.bundle import load_bundle
from index.job_store import JobStore
from index.store import image_id
from service.jobs import HEARTBEAT_S, JobBusy, JobManager
from tests.http_checks import assert_error

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "service" / "default_bundle"


def upload(base, gallery, blobs, metas, headers=None):
    files = [("files", (f"{n}.png", data, "application/octet-stream")) for n, data in enumerate(blobs)]
    r = httpx.post(f"{base}/v1/galleries/{gallery}/images", files=files, data={"metadata": json.dumps(metas)},
                   headers=headers, timeout=120)
    assert r.status_code == 201, r.text
    return [it["id"] for it in r.json()["items"]]


def search(base, gallery, data, **form):
    return httpx.post(f"{base}/v1/galleries/{gallery}/search", files={"file": ("q.png", data, "image/png")},
                      data=form, timeout=60)



def wait_job(base, job_id, timeout=60.0, headers=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, f"job still {job['status']} after {timeout} s: {job}"
        time.sleep(0.2)


def assert_self_score(score: float, query_flip: bool) -> None:
    """A gallery image searched with its own bytes: its stored vector is its plain embedding, so the score is 1,
    unless the bundle embeds queries with their mirror image (`query_flip`), which moves the query a little."""
    if query_flip:
        assert 0.95 < score < 1.0 + 1e-4, score
    else:
        assert score == pytest.approx(1.0, abs=1e-4)


def copy_bundle(src: Path, dst: Path, version: str) -> Path:
    """A copy with another version in its card (the card's hashes stay true: they cover the other files)."""
    shutil.copytree(src, dst)
    card = json.loads((dst / "model.json").read_text())
    card["version"] = version
    (dst / "model.json").write_text(json.dumps(card, indent=2))
    return dst


# ---------------------------------------------------------------------------- jobs (real Redis, no HTTP)


def _sleeper(started: threading.Event, procs: list):
    def work(ctx):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        procs.append(proc)
        ctx.attach(proc)
        started.set()
        proc.wait()
        ctx.check()
        return {"slept": True}
    return work


def test_cancel_kills_the_subprocess_and_frees_the_kind(redis_url):
    mgr = JobManager(JobStore(redis.Redis.from_url(redis_url)))
    started, procs = threading.Event(), []
    job = mgr.start("test", "g1", {"x": 1}, _sleeper(started, procs))
    assert job["status"] in ("queued", "running") and job["gallery"] == "g1" and job["params"] == {"x": 1}
    assert started.wait(30)
    with pytest.raises(JobBusy) as busy:
        mgr.start("test", None, {}, lambda ctx: {})
    assert busy.value.holder == job["id"]
    assert mgr.cancel(job["id"]) is True
    assert procs[0].wait(timeout=5) is not None  # killed, not left sleeping
    got = mgr.store.get(job["id"])
    assert got["status"] == "cancelled" and got["result"] is None
    assert mgr.cancel(job["id"]) is False  # already finished
    done = mgr.start("test", None, {}, lambda ctx: {"ok": True})  # the kind is free again
    deadline = time.monotonic() + 10
    while mgr.store.get(done["id"])["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    got = mgr.store.get(done["id"])
    assert got["result"] == {"ok": True} and got["progress"] == 1.0 and got["gallery"] is None
    mgr.shutdown()


def test_cancel_through_another_replica_reaches_the_owner(redis_url):
    owner = JobManager(JobStore(redis.Redis.from_url(redis_url)))
    other = JobManager(JobStore(redis.Redis.from_url(redis_url)))
    started, procs = threading.Event(), []
    job = owner.start("test", None, {}, _sleeper(started, procs))
    assert started.wait(30)
    assert other.cancel(job["id"]) is True
    assert procs[0].wait(timeout=HEARTBEAT_S + 10) is not None  # the owner's heartbeat saw it
    assert other.store.get(job["id"])["status"] == "cancelled"
    owner.shutdown()


def test_a_job_whose_owner_went_silent_reads_as_failed(redis_url):
    store = JobStore(redis.Redis.from_url(redis_url))
    job_id = uuid.uuid4().hex
    store.create(job_id, "test", None, {})
    store.r.hset(store.k_job(job_id), "heartbeat", "0")
    job = store.get(job_id)
    assert job["status"] == "failed" and "stopped responding" in job["message"]
    assert store.get("../etc") is None and store.get(uuid.uuid4().hex) is None


# ---------------------------------------------------------------------------- HTTP: errors and keys


def test_job_adapt_and_activate_errors(server_factory, make_settings, gallery_name, image_bytes):
    settings = make_settings(adapt_min_images=4)
    base = server_factory(settings).url
    g = gallery_name
    assert_error(httpx.get(f"{base}/v1/jobs/{uuid.uuid4().hex}"), 404, "job_not_found")
    assert_error(httpx.get(f"{base}/v1/jobs/not-a-job"), 404, "job_not_found")
    assert_error(httpx.delete(f"{base}/v1/jobs/{uuid.uuid4().hex}"), 404, "job_not_found")
    assert_error(httpx.post(f"{base}/v1/galleries/nope/adapt", json={}), 404, "gallery_not_found")

    upload(base, g, [image_bytes(s) for s in range(3)], [{"camera_id": str(s % 2)} for s in range(3)])
    assert_error(httpx.post(f"{base}/v1/galleries/{g}/adapt"), 422, "too_few_images")
    for bad in ({"epochs": 0}, {"epochs": 51}, {"epochs": "many"}, {"name": "../x"}, {"unknown": 1}):
        assert_error(httpx.post(f"{base}/v1/galleries/{g}/adapt", json=bad), 422, "validation_error")
    upload(base, g, [image_bytes(s) for s in range(3, 6)], [{"camera_id": "1"}] * 3)
    # enough images, but the tiny test bundle has no weights.pt (and torch may be missing too)
    assert_error(httpx.post(f"{base}/v1/galleries/{g}/adapt", json={"epochs": 2}), 501, "adaptation_unavailable")

    assert_error(httpx.post(f"{base}/v1/models/copy..1/activate"), 422, "invalid_bundle_id")
    r = httpx.post(f"{base}/v1/models/%2E%2E/activate")
    assert 400 <= r.status_code < 500 and r.json()["error"]["code"] in ("invalid_bundle_id", "not_found")
    assert_error(httpx.post(f"{base}/v1/models/missing-1/activate"), 404, "bundle_not_found")
    assert_error(httpx.post(f"{base}/v1/models/default/activate"), 409, "already_active")
    broken = write_tiny_bundle(settings.bundles_dir / "broken-1", seed=3, version="0.0.9")
    with open(broken / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    assert_error(httpx.post(f"{base}/v1/models/broken-1/activate"), 422, "invalid_bundle")
    models = httpx.get(f"{base}/v1/models").json()  # listing skips nothing that has a valid card
    assert models["active"] == {"bundle_id": "default", "name": "tiny-test", "version": "0.0.1",
                                "embedding_dim": 64, "parent": None}


def test_adapt_models_and_jobs_need_the_key(server_factory):
    base = server_factory(api_key="s3cret").url
    job = uuid.uuid4().hex
    for method, path in (("POST", "/v1/galleries/g1/adapt"), ("POST", "/v1/models/copy-1/activate"),
                         ("GET", "/v1/models"), ("GET", f"/v1/jobs/{job}"), ("DELETE", f"/v1/jobs/{job}")):
        assert_error(httpx.request(method, base + path), 401, "unauthorized")
        assert_error(httpx.request(method, base + path, headers={"X-API-Key": "wrong"}), 401, "unauthorized")
    assert httpx.get(f"{base}/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
    r = httpx.post(f"{base}/v1/galleries/g1/adapt", headers={"X-API-Key": "s3cret"})
    assert_error(r, 404, "gallery_not_found")


def test_activation_refuses_galleries_without_kept_bytes(server_factory, make_settings, gallery_name, image_bytes):
    settings = make_settings(keep_images=False, adapt_min_images=1)
    base = server_factory(settings).url
    upload(base, gallery_name, [image_bytes(s) for s in range(2)], [{}, {}])
    write_tiny_bundle(settings.bundles_dir / "other-1", seed=5, version="0.0.2")
    body = assert_error(httpx.post(f"{base}/v1/models/other-1/activate"), 409, "images_without_bytes")
    assert gallery_name in body["error"]["message"]
    assert_error(httpx.post(f"{base}/v1/galleries/{gallery_name}/adapt"), 422, "too_few_images")
    assert httpx.get(f"{base}/v1/models").json()["active"]["bundle_id"] == "default"


# ---------------------------------------------------------------------------- HTTP: activation


def test_activation_reembeds_switches_atomically_and_persists(server_factory, make_settings, image_bytes):
    settings = make_settings()  # serves the tiny bundle (dim 64) as "default"
    copy_bundle(DEFAULT_BUNDLE, settings.bundles_dir / "copy-1", "copy.1")  # dim 256, another encoder
    srv = server_factory(settings)
    base = srv.url
    imgs = {"cam-a": [image_bytes(s) for s in range(8)], "cam-b": [image_bytes(100 + s) for s in range(5)]}
    ids = {g: upload(base, g, blobs, [{"camera_id": str(n % 2)} for n in range(len(blobs))])
           for g, blobs in imgs.items()}

    listed = httpx.get(f"{base}/v1/models").json()
    assert listed["active"]["bundle_id"] == "default"
    assert {m["bundle_id"] for m in listed["available"]} == {"default", "copy-1"}

    # searches during the job: always answered, each by one model, own image first
    stop, answers, problems = threading.Event(), [], []

    def hammer():
        n = 0
        while not stop.is_set():
            r = search(base, "cam-a", imgs["cam-a"][n % 8], top_k=3)
            if r.status_code != 200 or r.json()["results"][0]["id"] != ids["cam-a"][n % 8]:
                problems.append(r.text)
            else:
                answers.append(r.json()["model"])
            n += 1

    t = threading.Thread(target=hammer)
    t.start()
    try:
        r = httpx.post(f"{base}/v1/models/copy-1/activate", timeout=60)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["kind"] == "activate" and job["params"] == {"bundle_id": "copy-1"}
        assert_error(httpx.post(f"{base}/v1/models/copy-1/activate"), 409)  # job_running, or already_active
        job = wait_job(base, job["id"])
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    assert job["status"] == "succeeded", job
    assert job["result"] == {"bundle_id": "copy-1", "name": "reid-default", "version": "copy.1"}
    assert job["progress"] == 1.0
    assert not problems, problems[:3]
    assert set(answers) == {"tiny-test:0.0.1", "reid-default:copy.1"} and answers[-1] == "reid-default:copy.1"
    assert_error(httpx.delete(f"{base}/v1/jobs/{job['id']}"), 409, "job_not_running")

    query_flip = load_bundle(settings.bundles_dir / "copy-1").query_flip

    def check_served(url):
        models = httpx.get(f"{url}/v1/models").json()
        assert models["active"] == {"bundle_id": "copy-1", "name": "reid-default", "version": "copy.1",
                                    "embedding_dim": 256, "parent": None}
        assert httpx.get(f"{url}/v1/model").json()["version"] == "copy.1"
        for g, blobs in imgs.items():
            assert httpx.get(f"{url}/v1/galleries/{g}").json()["count"] == len(blobs)
            for data, id_ in zip(blobs, ids[g]):
                res = search(url, g, data, top_k=2).json()
                assert res["model"] == "reid-default:copy.1" and res["results"][0]["id"] == id_
                assert_self_score(res["results"][0]["score"], query_flip)
        info = httpx.get(f"{url}/v1/galleries/cam-b/images/{ids['cam-b'][0]}").json()
        assert info["model"] == "reid-default:copy.1"
        assert httpx.get(f"{url}/readyz").status_code == 200

    check_served(base)
    # writes after the switch use the new model
    new = image_bytes(999)
    (new_id,) = upload(base, "cam-b", [new], [{"camera_id": "9"}])
    assert search(base, "cam-b", new).json()["results"][0]["id"] == new_id == image_id("cam-b", new)
    httpx.delete(f"{base}/v1/galleries/cam-b/images/{new_id}").raise_for_status()

    # a restart against the same Redis serves the activated bundle
    srv.stop()
    srv = server_factory(settings)
    check_served(srv.url)

    # ...and falls back to REID_MODEL_DIR when that bundle's directory is gone
    srv.stop()
    shutil.move(settings.bundles_dir / "copy-1", settings.data_dir / "elsewhere")
    srv = server_factory(settings)
    assert httpx.get(f"{srv.url}/v1/models").json()["active"]["bundle_id"] == "default"


# ---------------------------------------------------------------------------- HTTP: adaptation (torch)


@pytest.mark.slow
def test_adapt_job_end_to_end(server_factory, make_settings, tmp_path):
    pytest.importorskip("torch", reason="adaptation runs `reid adapt`, which needs torch")
    if not (ROOT / "models" / "adapt.py").exists():
        pytest.skip("`reid adapt` (models/adapt.py) is not there yet")
    if "weights.pt" not in json.loads((DEFAULT_BUNDLE / "model.json").read_text())["files"]:
        pytest.skip("the default bundle carries no weights.pt to adapt")
    from models.synthetic import make_synthetic

    market = tmp_path / "market"
    make_synthetic(market, n_train_ids=24, n_test_ids=2, cameras=2, images_per_id_per_cam=2, seed=3)
    paths = sorted((market / "bounding_box_train").glob("*.jpg"))
    assert len(paths) == 96
    fast = ["--batches-per-epoch", "2", "--p", "4", "--k", "4", "--eps", "0.5", "--min-samples", "2", "--k1", "10",
            "--k2", "2", "--nformer-epochs", "1", "--nformer-steps", "2", "--threads", "2"]
    settings = make_settings(model_dir=DEFAULT_BUNDLE, adapt_extra_args=fast)
    base = server_factory(settings).url
    g = "lobby"
    for i in range(0, len(paths), 32):
        chunk = paths[i:i + 32]
        upload(base, g, [p.read_bytes() for p in chunk],
               [{"camera_id": "entrance" if "_c1" in p.name else "lobby"} for p in chunk])

    r = httpx.post(f"{base}/v1/galleries/{g}/adapt", json={"epochs": 1, "name": "lobby-model"}, timeout=60)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "adapt" and job["gallery"] == g and job["params"]["epochs"] == 1
    job = wait_job(base, job["id"], timeout=300)
    assert job["status"] == "succeeded", job
    bundle_id = job["result"]["bundle_id"]
    assert bundle_id == job["params"]["bundle_id"] and bundle_id.startswith(f"{g}-adapted-")
    assert job["result"]["name"] == "lobby-model" and job["progress"] == 1.0

    models = httpx.get(f"{base}/v1/models").json()
    assert models["active"]["bundle_id"] == "default"
    adapted = next(m for m in models["available"] if m["bundle_id"] == bundle_id)
    assert adapted["name"] == "lobby-model" and adapted["parent"]["name"] == models["active"]["name"]
    card = json.loads((settings.bundles_dir / bundle_id / "model.json").read_text())
    assert card["adaptation"]["source"] == f"gallery:{g}" and card["adaptation"]["cameras"] == 2
    assert not list((settings.data_dir / "tmp").iterdir())  # the exported images are gone

    # one adaptation at a time; a cancel kills `reid adapt` and leaves nothing behind
    job = httpx.post(f"{base}/v1/galleries/{g}/adapt", json={"epochs": 1}, timeout=60).json()
    assert_error(httpx.post(f"{base}/v1/galleries/{g}/adapt", json={}), 409, "job_running")
    deadline = time.monotonic() + 120
    while httpx.get(f"{base}/v1/jobs/{job['id']}").json()["stage"] != "gracl":  # the subprocess is training
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = httpx.delete(f"{base}/v1/jobs/{job['id']}", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert not (settings.bundles_dir / job["params"]["bundle_id"]).exists()
    assert not list((settings.data_dir / "tmp").iterdir())
    left = subprocess.run(["pgrep", "-f", str(settings.data_dir / "tmp")], capture_output=True, text=True)
    assert left.stdout.strip() == ""
