"""`GET /v1/jobs`: a lost job id can be found again. The listing on a real Redis (index/job_store.py: newest
first, filters, bounded pages with a cursor, expired records dropped) and over real HTTP."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from index.job_store import STALE_AFTER_S, JobStore
from tests.http_checks import assert_error


def _ids(jobs: list[dict]) -> list[str]:
    return [j["id"] for j in jobs]


def test_store_lists_newest_first_with_filters_and_pages(redis_url):
    store = JobStore(redis.Redis.from_url(redis_url))
    made = []
    for i, (kind, gallery) in enumerate([("import", "a"), ("import", "b"), ("adapt", "a"), ("activate", None),
                                         ("import", "a")]):
        job_id = f"{i:032x}"
        store.create(job_id, kind, gallery, {"n": i})
        made.append(job_id)
        time.sleep(0.002)  # distinct creation times
    store.finish(made[0], "succeeded", "done", {"created": 3})
    store.update(made[1], status="running")
    newest_first = made[::-1]

    jobs, cursor = store.list()
    assert _ids(jobs) == newest_first and cursor is None
    assert jobs[-1]["status"] == "succeeded" and jobs[-1]["result"] == {"created": 3}
    assert _ids(store.list(gallery="a")[0]) == [made[4], made[2], made[0]]
    assert _ids(store.list(kind="import", gallery="a")[0]) == [made[4], made[0]]
    assert _ids(store.list(status="running")[0]) == [made[1]]
    assert _ids(store.list(kind="activate")[0]) == [made[3]]
    assert store.list(gallery="nowhere") == ([], None)

    # pages of 2: every job once, in order; the last page says so
    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = store.list(limit=2, cursor=cursor)
        seen += _ids(page)
        pages += 1
        if cursor is None:
            break
    assert seen == newest_first and pages == 3
    page, cursor = store.list(kind="import", limit=2)
    assert _ids(page) == [made[4], made[1]] and _ids(store.list(kind="import", limit=2, cursor=cursor)[0]) == [made[0]]

    # an expired record leaves the listing (and its index entry goes)
    store.r.delete(store.k_job(made[2]))
    assert made[2] not in _ids(store.list()[0])
    assert store.r.zscore(store.K_CREATED, made[2]) is None
    # a job whose owner went silent reads as failed, so it lists under failed
    store.r.hset(store.k_job(made[1]), "heartbeat", repr(time.time() - STALE_AFTER_S - 1))
    assert _ids(store.list(status="failed")[0]) == [made[1]]

    with pytest.raises(ValueError):
        store.list(cursor="not-a-cursor")

    # many jobs, created faster than the clock ticks (equal scores) and read in several chunks: each one once
    bulk = [f"{1000 + i:032x}" for i in range(230)]
    for job_id in bulk:
        store.create(job_id, "import", "bulk", {})
    seen, cursor = [], None
    while True:
        page, cursor = store.list(gallery="bulk", limit=70, cursor=cursor)
        assert len(page) == 70 or cursor is None
        seen += _ids(page)
        if cursor is None:
            break
    assert sorted(seen) == sorted(bulk) and len(seen) == len(set(seen))
    assert _ids(store.list(kind="activate")[0]) == [made[3]]  # found past several chunks of imports


def _import(base: str, gallery: str, image_bytes, seed: int) -> str:
    r = httpx.post(f"{base}/v1/galleries/{gallery}/imports",
                   files=[("files", (f"{i}.png", image_bytes(seed + i), "image/png")) for i in range(2)], timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return job_id


def test_http_lists_jobs(server_factory, image_bytes):
    base = server_factory().url
    first = _import(base, "lobby", image_bytes, 0)
    second = _import(base, "garage", image_bytes, 10)

    body = httpx.get(f"{base}/v1/jobs").json()
    assert _ids(body["jobs"]) == [second, first] and body["next_cursor"] is None
    assert body["jobs"][0]["kind"] == "import" and body["jobs"][0]["result"]["created"] == 2
    assert _ids(httpx.get(f"{base}/v1/jobs", params={"gallery": "lobby"}).json()["jobs"]) == [first]
    assert _ids(httpx.get(f"{base}/v1/jobs", params={"kind": "import", "status": "succeeded"}).json()["jobs"]) == \
        [second, first]
    assert httpx.get(f"{base}/v1/jobs", params={"status": "running"}).json() == {"jobs": [], "next_cursor": None}
    page = httpx.get(f"{base}/v1/jobs", params={"limit": 1}).json()
    assert _ids(page["jobs"]) == [second] and page["next_cursor"]
    assert _ids(httpx.get(f"{base}/v1/jobs", params={"limit": 1, "cursor": page["next_cursor"]}).json()["jobs"]) == \
        [first]

    for params, code in (({"limit": 0}, "validation_error"), ({"limit": 201}, "validation_error"),
                         ({"status": "done"}, "validation_error"), ({"kind": "train"}, "validation_error"),
                         ({"cursor": "x"}, "invalid_cursor")):
        assert_error(httpx.get(f"{base}/v1/jobs", params=params), 422, code)
