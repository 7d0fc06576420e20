"""What the web page needs from the server, over real HTTP (real uvicorn, Redis, ONNX Runtime): API docs that
work without internet, the page's security headers, search with a stored gallery image, and a paged listing
of a gallery's images. The page itself, in a browser, is tests/test_web_page.py."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.http_checks import assert_error

READ = "read-key"


def upload(base, g, blobs, metadata=None, headers=None):
    import json

    files = [("files", (name, data, "application/octet-stream")) for name, data in blobs]
    data = {"metadata": json.dumps(metadata)} if metadata else {}
    r = httpx.post(f"{base}/v1/galleries/{g}/images", files=files, data=data, headers=headers, timeout=60)
    assert r.status_code == 201, r.text
    return [x["id"] for x in r.json()["items"]]


def people(image_bytes, n=3, shots=2):
    blobs, meta = [], []
    for p in range(n):
        for s in range(shots):
            blobs.append((f"{p}_{s}.png", image_bytes(100 * p + s)))
            meta.append({"person_id": f"p{p}", "camera_id": f"c{s}", "external_id": f"x{p}{s}",
                         "captured_at": f"2024-05-0{s + 1}T10:0{p}:00Z"})
    return blobs, meta


# ---------------------------------------------------------------------------- /docs without internet

@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_only_local_assets(live_server, page):
    r = httpx.get(live_server + page)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert not re.search(r"https?://|//cdn|fonts\.googleapis", r.text), r.text  # nothing from the internet
    assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert any(a.endswith(".js") for a in assets), assets
    for a in assets:
        assert a.startswith("/"), a
        got = httpx.get(live_server + a)
        assert got.status_code == 200 and len(got.content) > 1000, (a, got.status_code)
        assert got.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(live_server + "/openapi.json").status_code == 200


# ---------------------------------------------------------------------------- security headers

def test_page_sends_security_headers_and_every_answer_nosniff(server_factory):
    srv = server_factory(api_key="k", max_upload_bytes=10_000)
    for path in ("/", "/static/app.js", "/static/style.css"):
        r = httpx.get(srv.url + path)
        assert r.status_code == 200, path
        csp = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";")
                   if part.strip())
        assert csp["frame-ancestors"] == "'none'"
        assert csp["script-src"] == "'self'" and csp["default-src"] == "'self'"  # no inline script
        assert "'unsafe-inline'" not in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    for path, status in (("/v1/galleries", 401), ("/healthz", 200), ("/nope", 404), ("/metrics", 200)):
        r = httpx.get(srv.url + path)
        assert r.status_code == status and r.headers["x-content-type-options"] == "nosniff", path
        assert "content-security-policy" not in r.headers  # the API's JSON is not a page
    too_big = httpx.post(srv.url + "/v1/galleries/g/images", content=b"x" * 20_000)  # answered by a middleware
    assert too_big.status_code == 413 and too_big.headers["x-content-type-options"] == "nosniff"


def test_an_unhandled_error_is_answered_nosniff_too(server_factory):
    """A 500 is answered by Starlette's outermost error middleware, past every other middleware."""
    srv = server_factory()

    async def fails():
        raise RuntimeError("a bug")

    srv.app.add_api_route("/fails", fails)  # a route that fails the way an unforeseen bug would
    r = httpx.get(srv.url + "/fails")
    assert_error(r, 500, "internal_error")
    assert r.headers["x-content-type-options"] == "nosniff"


def test_page_has_no_inline_script_and_keeps_the_key_out_of_local_storage(live_server):
    html = httpx.get(live_server + "/").text
    assert all('src="' in tag for tag in re.findall(r"<script[^>]*>", html))
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers either
    js = httpx.get(live_server + "/static/app.js").text
    assert "localStorage" not in js and "sessionStorage" in js


# ---------------------------------------------------------------------------- search with a stored image

def test_search_with_a_stored_image_matches_search_by_its_bytes(server_factory, gallery_name, image_bytes):
    srv = server_factory(api_key="w", api_keys_read=[READ])
    g, base, w = gallery_name, srv.url, {"X-API-Key": "w"}
    blobs, meta = people(image_bytes)
    ids = upload(base, g, blobs, meta, headers=w)
    by_file = httpx.post(f"{base}/v1/galleries/{g}/search", files={"file": ("q.png", blobs[2][1])},
                         data={"top_k": "4", "refine": "none"}, headers=w, timeout=60).json()
    assert by_file["results"][0]["id"] == ids[2]  # the image itself comes first when searched by its bytes
    r = httpx.post(f"{base}/v1/galleries/{g}/images/{ids[2]}/search", data={"top_k": "3", "refine": "none"},
                   headers={"X-API-Key": READ}, timeout=60)  # it only reads: a read-only key may
    assert r.status_code == 200, r.text
    body = r.json()
    # the same ranking, without the image itself; what a person reads comes with each result
    assert [x["id"] for x in body["results"]] == [x["id"] for x in by_file["results"][1:4]]
    for got, want in zip(body["results"], by_file["results"][1:4]):
        assert got["cosine"] == pytest.approx(want["cosine"], abs=1e-5)
        assert got["external_id"] and got["person_id"] and got["camera_id"] and got["captured_at"]
    assert body["refine_applied"] == "none" and body["model"] == by_file["model"]
    assert body["timing_ms"]["decode"] == 0 and body["timing_ms"]["embed"] == 0  # no image decoded or embedded

    # the filters of /search apply
    r = httpx.post(f"{base}/v1/galleries/{g}/images/{ids[2]}/search", headers=w, timeout=60,
                   data={"top_k": "10", "cameras": "c0"})
    assert {x["camera_id"] for x in r.json()["results"]} == {"c0"} and ids[2] not in [x["id"] for x in
                                                                                        r.json()["results"]]
    assert_error(httpx.post(f"{base}/v1/galleries/{g}/images/12345/search", headers=w), 404, "image_not_found")
    assert_error(httpx.post(f"{base}/v1/galleries/nope-{g}/images/{ids[0]}/search", headers=w), 404,
                 "gallery_not_found")
    assert_error(httpx.post(f"{base}/v1/galleries/{g}/images/{ids[0]}/search", data={"top_k": "0"}, headers=w),
                 422, "invalid_top_k")
    assert_error(httpx.post(f"{base}/v1/galleries/{g}/images/{ids[0]}/search", headers={"X-API-Key": "x"}), 401)


def test_search_with_a_stored_image_works_without_kept_bytes(server_factory, gallery_name, image_bytes):
    srv = server_factory(keep_images=False)
    blobs, meta = people(image_bytes)
    ids = upload(srv.url, gallery_name, blobs, meta)
    for refine in ("none", "kreciprocal", "auto"):
        r = httpx.post(f"{srv.url}/v1/galleries/{gallery_name}/images/{ids[0]}/search", timeout=60,
                       data={"top_k": "2", "refine": refine, "candidates": "2"})
        assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
        assert ids[0] not in [x["id"] for x in r.json()["results"]]


# ---------------------------------------------------------------------------- paged gallery listing

def test_gallery_images_listed_page_by_page(live_server, gallery_name, image_bytes):
    base, g = live_server, gallery_name
    blobs, meta = people(image_bytes, n=3, shots=2)
    ids = upload(base, g, blobs, meta)
    seen = []
    for offset in (0, 4):
        r = httpx.get(f"{base}/v1/galleries/{g}/images", params={"offset": offset, "limit": 4})
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["total"] == 6 and page["offset"] == offset and page["limit"] == 4
        assert len(page["images"]) == (4 if offset == 0 else 2)
        seen += page["images"]
    assert sorted(x["id"] for x in seen) == sorted(ids)
    assert [x["id"] for x in seen] == sorted(ids)  # a stable order: by id
    one = next(x for x in seen if x["id"] == ids[3])
    assert (one["person_id"], one["camera_id"], one["external_id"]) == ("p1", "c1", "x11")
    assert httpx.get(f"{base}/v1/galleries/{g}/images", params={"offset": 6}).json()["images"] == []
    assert httpx.get(f"{base}/v1/galleries/{g}/images").json()["limit"] == 48  # the default page
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}):
        assert_error(httpx.get(f"{base}/v1/galleries/{g}/images", params=bad), 422)
    assert_error(httpx.get(f"{base}/v1/galleries/nope-{g}/images"), 404, "gallery_not_found")
