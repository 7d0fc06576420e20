"""Issue 18: one rule for the labels read from names and forms, whatever the ingestion path, and metadata that
cannot crash the parser.

Over real HTTP (real uvicorn, real redis-server, the tiny ONNX model): a folder and the same files in archives
get the same person, camera and external id through ``reid ingest --folder``, one import with two archives, or
one import per archive; form values are stored exactly as given; ``.``/``..`` never become a camera; a
``metadata`` field nested 100,000 deep is a ``422 invalid_metadata``, not a 500.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import httpx
import pytest

from index.store import image_id
from scripts.cli import main as reid
from service.labels import labels_from_name
from tests.archives import tar_bytes
from tests.http_checks import assert_error

DEEP = "[" * 100_000 + "]" * 100_000


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _labels(base: str, gallery: str, data: bytes) -> dict:
    r = httpx.get(f"{base}/v1/galleries/{gallery}/images/{image_id(gallery, data)}")
    assert r.status_code == 200, r.text
    return {k: r.json()[k] for k in ("person_id", "camera_id", "external_id")}


def _import(base: str, gallery: str, files: list[tuple[str, bytes]]) -> dict:
    r = httpx.post(f"{base}/v1/galleries/{gallery}/imports", files=[("files", f) for f in files], timeout=60)
    assert r.status_code == 202, r.text
    job = httpx.get(f"{base}/v1/jobs/{r.json()['id']}").json()
    while job["status"] in ("queued", "running"):
        job = httpx.get(f"{base}/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    return job


def test_name_rule():
    assert labels_from_name("0001_c2s1_000151_01.png") == {"person_id": "1", "camera_id": "2",
                                                          "external_id": "0001_c2s1_000151_01.png"}
    assert labels_from_name("site/-1_c3.jpg") == {"person_id": "-1", "camera_id": "3", "external_id": "-1_c3.jpg"}
    assert labels_from_name("site/lobby/x.png") == {"camera_id": "lobby", "external_id": "x.png"}
    assert labels_from_name("x.png") == {"external_id": "x.png"}
    # `.` and `..` are not folders that name a camera: the path is read as it resolves
    assert labels_from_name("cam/../b.png") == {"external_id": "b.png"}
    assert labels_from_name("./b.png") == {"external_id": "b.png"}
    assert labels_from_name("../b.png") == {"external_id": "b.png"}
    assert labels_from_name("a/cam/./b.png") == {"camera_id": "cam", "external_id": "b.png"}
    assert labels_from_name("a/x/../cam/b.png") == {"camera_id": "cam", "external_id": "b.png"}


def test_name_rule_agrees_with_the_training_readers(tmp_path):
    """The person and camera a name gives are the numbers the training and evaluation readers read from it."""
    from models.data.datasets import read_market_folder

    names = ["0001_c1s1_000151_01.jpg", "0000_c6s1_000001_00.jpg", "-1_c2s1_000001_00.jpg", "1502_c10.jpg"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    for s in read_market_folder(tmp_path):
        got = labels_from_name(Path(s.path).name)
        assert (got["person_id"], got["camera_id"]) == (str(s.pid), str(s.camid))


def test_every_ingestion_path_gives_the_same_labels(server_factory, tmp_path, image_bytes):
    base = server_factory().url
    tree = {"camA/x.png": image_bytes(1), "camA/0001_c2s1_000151_01.png": image_bytes(2)}
    other = {"camB/y.png": image_bytes(3), "0002_c3s1_000001_00.png": image_bytes(4)}
    want = {"camA/x.png": {"person_id": None, "camera_id": "camA", "external_id": "x.png"},
            "camA/0001_c2s1_000151_01.png": {"person_id": "1", "camera_id": "2",
                                             "external_id": "0001_c2s1_000151_01.png"},
            "camB/y.png": {"person_id": None, "camera_id": "camB", "external_id": "y.png"},
            "0002_c3s1_000001_00.png": {"person_id": "2", "camera_id": "3",
                                        "external_id": "0002_c3s1_000001_00.png"}}
    files = {**tree, **other}

    _import(base, "two-archives", [("imp.tar", tar_bytes(tree)), ("imp.zip", _zip(other))])
    _import(base, "one-each", [("imp.tar", tar_bytes(tree))])
    _import(base, "one-each", [("imp.zip", _zip(other))])
    folder = tmp_path / "folder"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    assert reid(["ingest", "--url", base, "--gallery", "folder", "--folder", str(folder)]) == 0

    for gallery in ("two-archives", "one-each", "folder"):
        got = {name: _labels(base, gallery, data) for name, data in files.items()}
        assert got == want, gallery


def test_form_values_are_stored_exactly_as_given(live_server, image_bytes):
    base, g = live_server, "exact"
    r = httpx.post(f"{base}/v1/galleries/{g}/images", files=[("files", ("a.png", image_bytes(1)))],
                   data={"camera_id": " c1 ", "person_id": "\tp1\n", "external_id": " a "})
    assert r.status_code == 201, r.text
    assert r.json()["items"][0]["external_id"] == " a "
    assert _labels(base, g, image_bytes(1)) == {"person_id": "\tp1\n", "camera_id": " c1 ", "external_id": " a "}
    meta = json.dumps([{"camera_id": " c2", "person_id": "p2 "}])
    r = httpx.post(f"{base}/v1/galleries/{g}/images", files=[("files", ("b.png", image_bytes(2)))],
                   data={"metadata": meta})
    assert r.status_code == 201, r.text
    assert _labels(base, g, image_bytes(2)) == {"person_id": "p2 ", "camera_id": " c2", "external_id": None}


def test_a_dot_dot_name_never_becomes_a_camera(live_server, image_bytes):
    """An import's plain file named ``cam/../b.png`` is refused like an archive member with a ``..`` path."""
    base, g = live_server, "dots"
    r = httpx.post(f"{base}/v1/galleries/{g}/imports", files=[("files", ("cam/../b.png", image_bytes(1)))])
    assert_error(r, 422, "unsafe_name")
    assert httpx.get(f"{base}/v1/galleries/{g}").status_code == 404  # nothing imported
    job = _import(base, g, [("./cam/b.png", image_bytes(2))])  # `.` is harmless: read as cam/b.png
    assert job["result"]["created"] == 1
    assert _labels(base, g, image_bytes(2)) == {"person_id": None, "camera_id": "cam", "external_id": "b.png"}


@pytest.mark.parametrize("depth", [100_000, 50])
def test_deeply_nested_metadata_is_invalid_metadata(live_server, image_bytes, depth):
    base, g = live_server, "deep"
    nested = "[" * depth + "]" * depth
    r = httpx.post(f"{base}/v1/galleries/{g}/images", files=[("files", ("a.png", image_bytes(1)))],
                   data={"metadata": nested}, timeout=60)
    assert_error(r, 422, "invalid_metadata")
    r = httpx.post(f"{base}/v1/galleries/{g}/images", files=[("files", ("a.png", image_bytes(1)))],
                   data={"metadata": json.dumps([{"person_id": "p1", "camera_id": "c1"}])})
    assert r.status_code == 201, r.text
    r = httpx.post(f"{base}/v1/galleries/{g}/evaluate", files=[("files", ("q.png", image_bytes(2)))],
                   data={"metadata": nested}, timeout=60)
    assert_error(r, 422, "invalid_metadata")
    assert httpx.get(f"{base}/readyz").status_code == 200
