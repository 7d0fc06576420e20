"""End-to-end over HTTP: real uvicorn, real redis-server, real ONNX Runtime, real FAISS."""

import json

import httpx
import pytest

from index.redis_server import EmbeddedRedis
from index.store import image_id
from tests.http_checks import assert_error


def upload(base, gallery, blobs, **form):
    files = [("files", (name, data, "application/octet-stream")) for name, data in blobs]
    return httpx.post(f"{base}/v1/galleries/{gallery}/images", files=files, data=form, timeout=60)


def search(base, gallery, data, **form):
    return httpx.post(f"{base}/v1/galleries/{gallery}/search",
                      files={"file": ("q.png", data, "image/png")}, data=form, timeout=60)



def test_health_ready_model_and_page(live_server):
    assert httpx.get(f"{live_server}/healthz").json() == {"status": "ok"}
    r = httpx.get(f"{live_server}/readyz")
    assert r.status_code == 200 and r.json()["checks"]["store"] is True
    card = httpx.get(f"{live_server}/v1/model").json()
    assert card["name"] == "tiny-test" and card["embedding_dim"] == 64
    page = httpx.get(f"{live_server}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "search" in page.text
    assert httpx.get(f"{live_server}/openapi.json").json()["paths"]["/v1/galleries/{gallery}/search"]
    assert_error(httpx.get(f"{live_server}/nope"), 404, "not_found")
    metrics = httpx.get(f"{live_server}/metrics").text
    assert 'reid_http_requests_total{method="GET",route="/readyz",status="200"} 1.0' in metrics
    assert 'route="unmatched",status="404"' in metrics


def test_ingest_search_reupload_delete(live_server, gallery_name, image_bytes):
    base, g = live_server, gallery_name
    imgs = [(f"img{s}.png", image_bytes(s)) for s in range(6)]
    meta = [{"camera_id": str(s % 3), "person_id": f"p{s // 2}", "external_id": f"e{s}",
             "captured_at": "2024-01-01T00:00:00Z"} for s in range(6)]
    r = upload(base, g, imgs, metadata=json.dumps(meta))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["errors"] == [] and [it["status"] for it in body["items"]] == ["created"] * 6
    ids = [it["id"] for it in body["items"]]
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert ids[0] == image_id(g, imgs[0][1])
    assert [it["external_id"] for it in body["items"]] == [f"e{s}" for s in range(6)]
    detail = httpx.get(f"{base}/v1/galleries/{g}").json()
    model = httpx.get(f"{base}/v1/models").json()["active"]
    auto = detail.pop("refine_auto")
    assert detail == {"name": g, "count": 6, "cameras": {"0": 2, "1": 2, "2": 2}, "indexed": 6, "index": "flat",
                      "model": f"{model['name']}:{model['version']}"}
    assert auto["mode"] == "none" and auto["profile"] is None  # 6 images: too few to tell, so not refined
    assert {"name": g, "count": 6} in httpx.get(f"{base}/v1/galleries").json()["galleries"]

    r = search(base, g, imgs[4][1], top_k=3)
    assert r.status_code == 200, r.text
    res = r.json()
    assert len(res["results"]) == 3 and res["model"] == "tiny-test:0.0.1"
    top = res["results"][0]
    assert top["id"] == ids[4] and top["score"] == pytest.approx(1.0, abs=1e-4)
    assert (top["camera_id"], top["person_id"], top["external_id"]) == ("1", "p2", "e4")
    assert res["results"][1]["score"] < 0.9999
    assert set(res["timing_ms"]) == {"decode", "embed", "search", "total"}

    # exclude_camera_id drops camera "1" (images 1 and 4) but still returns top_k results
    r = search(base, g, imgs[4][1], top_k=4, exclude_camera_id="1")
    got = [x["id"] for x in r.json()["results"]]
    assert len(got) == 4 and ids[4] not in got and ids[1] not in got

    # re-upload of the same bytes: same id, "exists", nothing new stored
    r = upload(base, g, [("again.png", imgs[2][1])], external_id="other")
    assert r.status_code == 201
    item = r.json()["items"][0]
    assert (item["id"], item["status"], item["external_id"]) == (ids[2], "exists", "e2")
    assert httpx.get(f"{base}/v1/galleries/{g}").json()["count"] == 6

    info = httpx.get(f"{base}/v1/galleries/{g}/images/{ids[2]}").json()
    assert info["filename"] == "img2.png" and info["camera_id"] == "2" and info["model"] == "tiny-test:0.0.1"

    # delete -> gone from search and metadata
    r = httpx.delete(f"{base}/v1/galleries/{g}/images/{ids[4]}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    r = search(base, g, imgs[4][1], top_k=10)
    assert ids[4] not in [x["id"] for x in r.json()["results"]] and len(r.json()["results"]) == 5
    assert_error(httpx.get(f"{base}/v1/galleries/{g}/images/{ids[4]}"), 404, "image_not_found")
    assert_error(httpx.delete(f"{base}/v1/galleries/{g}/images/{ids[4]}"), 404, "image_not_found")

    # delete the gallery
    assert httpx.delete(f"{base}/v1/galleries/{g}").status_code == 200
    assert_error(httpx.get(f"{base}/v1/galleries/{g}"), 404, "gallery_not_found")
    assert_error(search(base, g, imgs[0][1]), 404, "gallery_not_found")
    assert httpx.get(f"{base}/readyz").status_code == 200


def test_mixed_good_and_bad_upload(live_server, gallery_name, image_bytes):
    base, g = live_server, gallery_name
    jpeg = image_bytes(11, fmt="JPEG")
    blobs = [("good1.png", image_bytes(10)), ("notes.txt", b"hello, not an image"),
             ("trunc.jpg", jpeg[: len(jpeg) // 2]), ("good2.jpg", jpeg), ("good1-dup.png", image_bytes(10))]
    r = upload(base, g, blobs, camera_id="7")
    assert r.status_code == 201, r.text
    body = r.json()
    assert [(it["index"], it["status"]) for it in body["items"]] == [(0, "created"), (3, "created"), (4, "exists")]
    assert body["items"][0]["id"] == body["items"][2]["id"]
    errs = {e["index"]: e for e in body["errors"]}
    assert set(errs) == {1, 2}
    assert errs[1]["code"] == "unsupported_media_type" and errs[1]["filename"] == "notes.txt"
    assert errs[2]["code"] in ("truncated_image", "invalid_image")
    assert httpx.get(f"{base}/v1/galleries/{g}").json()["count"] == 2
    r = search(base, g, jpeg)
    assert r.json()["results"][0]["id"] == body["items"][1]["id"]
    assert r.json()["results"][0]["camera_id"] == "7"


def test_request_errors(live_server, gallery_name, image_bytes):
    base, g = live_server, gallery_name
    # every file bad -> 422 with the per-file errors
    r = upload(base, g, [("a.txt", b"nope"), ("b.bin", b"\x00\x01")])
    body = assert_error(r, 422, "no_valid_images")
    assert [e["index"] for e in body["errors"]] == [0, 1]
    assert_error(httpx.get(f"{base}/v1/galleries/{g}"), 404, "gallery_not_found")  # not created
    # metadata problems
    assert_error(upload(base, g, [("a.png", image_bytes(1))], metadata="[{}, {}]"), 422, "invalid_metadata")
    assert_error(upload(base, g, [("a.png", image_bytes(1))], metadata="{bad"), 422, "invalid_metadata")
    assert_error(upload(base, g, [("a.png", image_bytes(1)), ("b.png", image_bytes(2))], external_id="x"),
                 422, "invalid_metadata")
    assert_error(upload(base, "bad name!", [("a.png", image_bytes(1))]), 422, "invalid_gallery_name")
    # no files at all -> validation error in the uniform shape
    r = httpx.post(f"{base}/v1/galleries/{g}/images", data={"camera_id": "1"})
    assert_error(r, 422, "validation_error")
    # search parameters
    assert upload(base, g, [("a.png", image_bytes(1))]).status_code == 201
    assert_error(search(base, g, image_bytes(1), refine="nformer"), 422, "unsupported_refine")
    assert "none" in search(base, g, image_bytes(1), refine="joint").json()["error"]["message"]
    assert_error(search(base, g, image_bytes(1), top_k=0), 422, "invalid_top_k")
    assert_error(search(base, g, image_bytes(1), top_k=100000), 422, "invalid_top_k")
    assert_error(search(base, g, image_bytes(1), top_k="ten"), 422, "validation_error")
    assert_error(search(base, g, b"GIF89a-garbage"), 422)
    assert_error(search(base, g, b"plain text"), 415, "unsupported_media_type")
    assert_error(search(base, "never-made-" + g, image_bytes(1)), 404, "gallery_not_found")
    assert_error(httpx.get(f"{base}/v1/galleries/{g}/images/notanint"), 422, "validation_error")


def test_limits(server_factory, gallery_name, image_bytes):
    srv = server_factory(max_upload_bytes=50_000, max_files_per_request=2, max_image_pixels=60 * 60)
    base, g = srv.url, gallery_name
    assert_error(upload(base, g, [("big.bmp", image_bytes(1, fmt="BMP", size=(200, 200)))]), 413,
                 "payload_too_large")
    assert_error(upload(base, g, [(f"{i}.png", image_bytes(i, size=(8, 8))) for i in range(3)]), 413,
                 "too_many_files")
    body = upload(base, g, [("px.png", image_bytes(1, size=(80, 80))), ("ok.png", image_bytes(2, size=(40, 40)))])
    assert body.status_code == 201
    assert body.json()["errors"][0]["code"] == "image_too_large"
    assert_error(search(base, g, image_bytes(1, size=(80, 80))), 413, "image_too_large")

    # a chunked body without Content-Length is cut off too (and a small one still works)
    def chunked(data: bytes):
        req = httpx.Request("POST", f"{base}/v1/galleries/{g}/images",
                            files=[("files", ("c.bmp", data, "image/bmp"))])
        body = req.read()
        headers = {"content-type": req.headers["content-type"]}
        return httpx.post(req.url, content=(body[i:i + 8192] for i in range(0, len(body), 8192)),
                          headers=headers, timeout=60)

    big = image_bytes(3, fmt="BMP", size=(200, 200))
    assert len(big) > 50_000
    assert_error(chunked(big), 413, "payload_too_large")
    r = chunked(image_bytes(4, fmt="BMP", size=(40, 40)))
    assert r.status_code == 201, r.text


def test_restart_rebuilds_index_from_store(server_factory, make_settings, gallery_name, image_bytes, tmp_path):
    g = gallery_name
    settings = make_settings(data_dir=tmp_path / "shared")
    srv = server_factory(settings)
    imgs = [image_bytes(100 + s) for s in range(4)]
    ids = [it["id"] for it in upload(srv.url, g, [(f"{s}.png", d) for s, d in enumerate(imgs)]).json()["items"]]
    srv.stop()
    srv2 = server_factory(settings)  # new app, new process state, same Redis
    assert httpx.get(f"{srv2.url}/readyz").status_code == 200
    r = search(srv2.url, g, imgs[3], top_k=4)
    assert [x["id"] for x in r.json()["results"]][0] == ids[3]
    assert len(r.json()["results"]) == 4


def test_embedded_redis_mode_and_restart(server_factory, tiny_bundle, tmp_path, image_bytes):
    """No redis_url: the app starts its own redis-server under data_dir and data survives restart."""
    data = tmp_path / "embedded"
    srv = server_factory(redis_url=None, data_dir=data)
    r = upload(srv.url, "people", [("a.png", image_bytes(1)), ("b.png", image_bytes(2))])
    assert r.status_code == 201
    srv.stop()
    assert (data / "redis" / "appendonly.aof").exists()
    srv2 = server_factory(redis_url=None, data_dir=data)
    res = search(srv2.url, "people", image_bytes(2)).json()["results"]
    assert res[0]["id"] == r.json()["items"][1]["id"] and len(res) == 2


def test_redis_down_gives_503_json_with_retry_after(server_factory, tmp_path, image_bytes):
    redis_srv = EmbeddedRedis(tmp_path / "r").start()
    try:
        srv = server_factory(redis_url=redis_srv.url)
        assert upload(srv.url, "cams", [("a.png", image_bytes(1))]).status_code == 201
        redis_srv.kill()
        for r in (search(srv.url, "cams", image_bytes(1)),
                  upload(srv.url, "cams", [("b.png", image_bytes(2))]),
                  httpx.get(f"{srv.url}/v1/galleries"),
                  httpx.get(f"{srv.url}/readyz")):
            body = assert_error(r, 503)
            assert r.headers["retry-after"].isdigit(), r.headers
            assert body["error"]["code"] in ("store_unavailable", "not_ready")
        assert httpx.get(f"{srv.url}/healthz").status_code == 200  # alive, just not ready
        redis_srv.start()  # same port, AOF replayed: service recovers without restart
        r = search(srv.url, "cams", image_bytes(1))
        assert r.status_code == 200 and r.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    finally:
        redis_srv.stop()


def test_readyz_reports_index_out_of_sync_and_reupload_reconciles(live_server, redis_url, gallery_name,
                                                                   image_bytes):
    """An image in the store but not in the index. A write through the store logs a change that the follower
    applies (tests/test_replicas.py); one that bypasses the change log (here: raw HSETs) stays unindexed."""
    import numpy as np

    from index.store import RedisStore
    from tests.store_writes import write_image_unlogged

    base, g = live_server, gallery_name
    assert upload(base, g, [("a.png", image_bytes(1))]).status_code == 201
    data = image_bytes(2)
    store = RedisStore(redis_url)
    vec = np.random.default_rng(0).normal(size=64).astype(np.float32)
    i = image_id(g, data)
    write_image_unlogged(store, g, i, (vec / np.linalg.norm(vec)).astype("<f4").tobytes(), {"camera_id": "9"})
    store.close()
    r = httpx.get(f"{base}/readyz")
    body = assert_error(r, 503, "not_ready")
    assert f"gallery {g}: index has 1 vectors, store has 2" in body["error"]["message"]
    assert body["checks"]["index"] is False and body["checks"]["store"] is True
    r = upload(base, g, [("b.png", data)])
    assert r.json()["items"][0]["status"] == "exists"
    assert httpx.get(f"{base}/readyz").status_code == 200
    # a gallery written only by another writer becomes searchable here too
    other = g + "-other"
    store = RedisStore(redis_url)
    store.put(other, 42, vec, {"camera_id": "3"})
    store.close()
    assert httpx.get(f"{base}/readyz").status_code == 200
    res = search(base, other, image_bytes(5)).json()["results"]
    assert [x["id"] for x in res] == [42]


def test_bad_bundle_fails_startup_and_stops_embedded_redis(server_factory, tmp_path, tiny_bundle):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    (bad / "encoder.onnx").write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="start-up"):
        server_factory(redis_url=None, data_dir=tmp_path / "d", model_dir=bad)
    log = (tmp_path / "d" / "redis" / "redis-server.log").read_text()
    assert "ready to exit" in log.lower()  # the embedded Redis was shut down, not leaked


def test_api_key(server_factory, gallery_name, image_bytes):
    srv = server_factory(api_key="s3cret")
    assert_error(httpx.get(f"{srv.url}/v1/galleries"), 401, "unauthorized")
    assert_error(httpx.get(f"{srv.url}/v1/model", headers={"X-API-Key": "wrong"}), 401, "unauthorized")
    assert_error(upload(srv.url, gallery_name, [("a.png", image_bytes(1))]), 401, "unauthorized")
    ok = httpx.get(f"{srv.url}/v1/galleries", headers={"X-API-Key": "s3cret"})
    assert ok.status_code == 200
    assert httpx.get(f"{srv.url}/readyz").status_code == 200  # probes stay open
    assert httpx.get(f"{srv.url}/healthz").status_code == 200
