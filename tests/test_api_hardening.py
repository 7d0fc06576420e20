"""Issue 18, defects 5-7 (real uvicorn, real redis-server, real ONNX Runtime): calibration refuses target FPRs
its impostor pairs cannot measure, /metrics behind a key, RFC 9110 If-None-Match, camera lists that cannot
silently widen a search and that can name ids holding a comma, a clear error for an over-long multipart file
name, REID_MAX_IMAGE_PIXELS as the only pixel limit, and delete answers without an undocumented ``"id": null``."""

from __future__ import annotations

import json
import struct
import zlib

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from service.calibration import CalibrationError, calibrate
from service.deletion import FilterError
from service.images import ImageError, decode_image
from service.search_filter import SearchFilter
from service.settings import Settings
from tests.http_checks import assert_error


def upload(base, g, blobs, headers=None, **form):
    files = [("files", (name, data, "application/octet-stream")) for name, data in blobs]
    return httpx.post(f"{base}/v1/galleries/{g}/images", files=files, data=form, headers=headers, timeout=60)


# ---------------------------------------------------------------------------- 5: calibration needs ~1/FPR impostors

def _two_camera_people(n_people: int) -> tuple[list[str], list[str], np.ndarray]:
    """Each person seen once by camera a and once by b: n genuine and n(n-1) impostor cross-camera pairs."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(n_people, 16))
    vecs = np.concatenate([centres + 0.1 * rng.normal(size=centres.shape) for _ in "ab"]).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    pids = [f"p{i}" for i in range(n_people)] * 2
    cams = ["a"] * n_people + ["b"] * n_people
    return pids, cams, vecs


def test_calibrate_refuses_a_target_fpr_its_impostor_pairs_cannot_measure():
    pids, cams, vecs = _two_camera_people(4)  # 12 impostor pairs
    calib = calibrate(pids, cams, vecs, target_fpr=1 / 12, max_pairs=1_000_000)  # exactly 1/target: enough
    assert calib["impostor_pairs"] == 12
    with pytest.raises(CalibrationError) as e:
        calibrate(pids, cams, vecs, target_fpr=1 / 13, max_pairs=1_000_000)
    assert e.value.code == "too_few_impostor_pairs"
    assert "12 impostor" in str(e.value) and "13" in str(e.value) and "target_fpr" in str(e.value)
    # enough pairs in the gallery, but the sample cap keeps fewer: the message names the setting
    with pytest.raises(CalibrationError, match="REID_CALIBRATE_MAX_PAIRS") as e:
        calibrate(pids, cams, vecs, target_fpr=0.1, max_pairs=5)
    assert e.value.code == "too_few_impostor_pairs"


def test_calibrate_three_labelled_images_is_422(live_server, gallery_name, image_bytes):
    base, g = live_server, gallery_name
    blobs = [(f"{i}.png", image_bytes(i)) for i in range(3)]
    meta = [{"person_id": "p0", "camera_id": "c0"}, {"person_id": "p0", "camera_id": "c1"},
            {"person_id": "p1", "camera_id": "c1"}]  # 1 genuine and 1 impostor cross-camera pair
    assert upload(base, g, blobs, metadata=json.dumps(meta)).status_code == 201
    body = assert_error(httpx.post(f"{base}/v1/galleries/{g}/calibrate"), 422, "too_few_impostor_pairs")
    assert "1000" in body["error"]["message"]  # the default target 1e-3 needs 1000 impostor pairs
    assert_error(httpx.post(f"{base}/v1/galleries/{g}/calibrate", json={"target_fpr": 0.5}), 422,
                 "too_few_impostor_pairs")  # 1 pair cannot measure 0.5 either: it needs 2
    assert_error(httpx.get(f"{base}/v1/galleries/{g}/calibration"), 404, "not_calibrated")  # nothing kept


# ---------------------------------------------------------------------------- 6: /metrics behind a key

READ, WRITE = "read-key", "write-key"


def test_metrics_behind_a_key_when_asked(server_factory):
    open_metrics = server_factory(api_keys_read=[READ], api_keys_write=[WRITE])
    assert httpx.get(f"{open_metrics.url}/metrics").status_code == 200  # the default: scrapers need no key
    srv = server_factory(api_keys_read=[READ], api_keys_write=[WRITE], metrics_require_key=True)
    assert_error(httpx.get(f"{srv.url}/metrics"), 401, "unauthorized")
    assert_error(httpx.get(f"{srv.url}/metrics", headers={"X-API-Key": "wrong"}), 401, "unauthorized")
    for key in (READ, WRITE):  # reading metrics is a read
        r = httpx.get(f"{srv.url}/metrics", headers={"X-API-Key": key})
        assert r.status_code == 200 and "reid_http_requests_total" in r.text
    assert httpx.get(f"{srv.url}/healthz").status_code == 200  # probes stay open


def test_metrics_require_key_needs_a_key(tmp_path):
    with pytest.raises(ValidationError, match="REID_METRICS_REQUIRE_KEY"):
        Settings(data_dir=tmp_path, metrics_require_key=True)
    assert Settings(data_dir=tmp_path, metrics_require_key=True, api_key="k").metrics_require_key


# ---------------------------------------------------------------------------- 7: If-None-Match (RFC 9110 13.1.2)

def test_none_match_tags_parse_weak_tags_lists_and_star():
    from service.etag import none_match_tags

    assert none_match_tags(None) == frozenset()
    assert none_match_tags('"a"') == {'"a"'}
    assert none_match_tags('W/"a", "b,c" ,W/"d"') == {'"a"', '"b,c"', '"d"'}  # weak comparison drops W/
    assert none_match_tags(" * ") == {"*"}
    assert none_match_tags("garbage") == frozenset()


def test_thumbnail_if_none_match_weak_star_and_lists(live_server, gallery_name, image_bytes):
    base, g = live_server, gallery_name
    image_id = upload(base, g, [("a.png", image_bytes(1))]).json()["items"][0]["id"]
    url = f"{base}/v1/galleries/{g}/images/{image_id}/thumbnail"
    etag = httpx.get(url).headers["etag"]
    for header in (etag, f"W/{etag}", "*", f'"nope", W/{etag}'):
        r = httpx.get(url, headers={"If-None-Match": header})
        assert r.status_code == 304, header
        assert r.headers["etag"] == etag
    assert httpx.get(url, headers={"If-None-Match": '"nope"'}).status_code == 200
    # "*" matches a current representation only: a missing image is still a 404
    assert_error(httpx.get(f"{base}/v1/galleries/{g}/images/123/thumbnail", headers={"If-None-Match": "*"}),
                 404, "image_not_found")


# ---------------------------------------------------------------------------- 7: camera lists

def test_camera_lists_comma_and_json_forms():
    assert SearchFilter.from_form(cameras="c1, c2").cameras == {"c1", "c2"}
    assert SearchFilter.from_form(cameras='["a,b", " c "]').cameras == {"a,b", " c "}  # JSON: verbatim
    assert SearchFilter.from_form(cameras="").cameras is None  # an empty form field is an absent one
    for bad in (",,,", " , ", "[]", '[""]', "[1]", '["a", 2]', '[["a"]]', "[" * 100_000):
        for field in ("cameras", "exclude_cameras"):
            with pytest.raises(FilterError) as e:
                SearchFilter.from_form(**{field: bad})
            assert e.value.code == "invalid_camera_list", (field, bad)
            assert field in str(e.value)


def test_search_camera_filters_over_http(live_server, gallery_name, image_bytes):
    base, g = live_server, gallery_name
    blobs = [(f"{i}.png", image_bytes(i)) for i in range(3)]
    meta = [{"camera_id": "door,left"}, {"camera_id": "door"}, {"camera_id": "left"}]
    assert upload(base, g, blobs, metadata=json.dumps(meta)).status_code == 201

    def search(**form):
        return httpx.post(f"{base}/v1/galleries/{g}/search", files={"file": ("q.png", blobs[0][1])},
                          data={"top_k": 10, **form}, timeout=60)

    assert {x["camera_id"] for x in search(cameras='["door,left"]').json()["results"]} == {"door,left"}
    assert {x["camera_id"] for x in search(exclude_cameras='["door,left"]').json()["results"]} == {"door", "left"}
    assert {x["camera_id"] for x in search(cameras="door,left").json()["results"]} == {"door", "left"}
    assert_error(search(cameras=",,,"), 422, "invalid_camera_list")
    assert_error(search(exclude_cameras=","), 422, "invalid_camera_list")


# ---------------------------------------------------------------------------- 7: multipart part header limit

def test_overlong_multipart_file_name_names_the_limit(live_server, gallery_name, image_bytes):
    r = upload(live_server, gallery_name, [("x" * 8192 + ".png", image_bytes(1))])
    body = assert_error(r, 400, "multipart_header_too_large")
    assert "file name" in body["error"]["message"] and "4224" in body["error"]["message"]
    assert upload(live_server, gallery_name, [("x" * 2000 + ".png", image_bytes(1))]).status_code == 201


# ---------------------------------------------------------------------------- 7: REID_MAX_IMAGE_PIXELS is the limit

def _png_header_only(w, h):
    """A PNG that claims w x h pixels (decompression-bomb shape) with a tiny body."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("w, h", [(10_000, 10_000), (20_000, 10_000), (20_000, 20_000)])  # 100 M, 200 M, 400 M
def test_pixel_limit_message_is_ours_above_pillows_bounds(w, h):
    with pytest.raises(ImageError) as e:
        decode_image(_png_header_only(w, h), max_pixels=40_000_000)
    assert (e.value.status_code, e.value.code) == (413, "image_too_large")
    assert f"{w * h} pixels" in e.value.message and "the limit is 40000000 (REID_MAX_IMAGE_PIXELS)" in e.value.message
    assert "decompression bomb DOS" not in e.value.message


def test_pixel_limit_above_pillows_warning_bound_is_honoured():
    # 100 M pixels under a 150 M limit: not refused for size (this header-only PNG then fails to decode)
    with pytest.raises(ImageError) as e:
        decode_image(_png_header_only(10_000, 10_000), max_pixels=150_000_000)
    assert e.value.status_code == 422
    # above Pillow's hard bound (2 x Image.MAX_IMAGE_PIXELS) a larger setting cannot help: the message says so
    with pytest.raises(ImageError) as e:
        decode_image(_png_header_only(20_000, 10_000), max_pixels=500_000_000)
    assert e.value.status_code == 413 and "200000000 pixels" in e.value.message and "Pillow" in e.value.message


# ---------------------------------------------------------------------------- 7: delete answers

def test_delete_answers_have_no_null_id(live_server, gallery_name, image_bytes):
    base, g = live_server, gallery_name
    ids = [it["id"] for it in upload(base, g, [(f"{i}.png", image_bytes(i)) for i in range(2)]).json()["items"]]
    one = httpx.delete(f"{base}/v1/galleries/{g}/images/{ids[0]}").json()
    assert one == {"deleted": True, "gallery": g, "id": ids[0], "count": 1}
    assert httpx.delete(f"{base}/v1/galleries/{g}").json() == {"deleted": True, "gallery": g, "count": 1}
    schema = httpx.get(f"{base}/openapi.json").json()
    ok = schema["paths"]["/v1/galleries/{gallery}"]["delete"]["responses"]["200"]["content"]["application/json"]
    name = ok["schema"]["$ref"].rsplit("/", 1)[-1]
    assert "id" not in schema["components"]["schemas"][name]["properties"]
