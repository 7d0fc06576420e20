"""`candidates` (K of local/kreciprocal) over real HTTP: a K below top_k is refused rather than silently raised,
and the answer says how many candidates were refined when the gallery (after the filters) holds fewer than K."""

from __future__ import annotations

import json

import httpx

from tests.http_checks import assert_error

CAMERAS = ["1", "1", "2", "2", "2", "3"]


def _gallery(base: str, gallery: str, image_bytes) -> None:
    files = [("files", (f"g{i}.png", image_bytes(i), "image/png")) for i in range(len(CAMERAS))]
    meta = json.dumps([{"camera_id": c} for c in CAMERAS])
    assert httpx.post(f"{base}/v1/galleries/{gallery}/images", files=files, data={"metadata": meta},
                      timeout=60).status_code == 201


def _search(base: str, gallery: str, image: bytes, path: str = "search", **form) -> httpx.Response:
    field = "file" if path == "search" else "files"
    return httpx.post(f"{base}/v1/galleries/{gallery}/{path}", files=[(field, ("q.png", image, "image/png"))],
                      data={k: str(v) for k, v in form.items()}, timeout=60)


def test_candidates_below_top_k_is_refused_and_the_refined_count_is_reported(server_factory, gallery_name,
                                                                               image_bytes):
    base = server_factory(refine_candidates=3).url
    _gallery(base, gallery_name, image_bytes)
    query = image_bytes(100)

    # asked for fewer candidates than results: refused, naming both, for every mode and every search route
    for refine in ("kreciprocal", "none", "auto"):
        body = assert_error(_search(base, gallery_name, query, refine=refine, top_k=5, candidates=3), 422,
                            "invalid_candidates")
        assert "top_k" in body["error"]["message"] and "3" in body["error"]["message"]
    assert_error(_search(base, gallery_name, query, "search:batch", refine="kreciprocal", top_k=5, candidates=2),
                 422, "invalid_candidates")

    # K above the gallery's size: K is reported as asked, and candidates_used says how many there were
    body = _search(base, gallery_name, query, refine="kreciprocal", top_k=5, candidates=50).json()
    assert body["candidates"] == 50 and body["candidates_used"] == len(CAMERAS) and len(body["results"]) == 5
    # the filters count too: 3 images of camera 2
    body = _search(base, gallery_name, query, refine="kreciprocal", top_k=2, candidates=50, cameras="2").json()
    assert body["candidates_used"] == 3 and {r["camera_id"] for r in body["results"]} == {"2"}
    # a batch: the most any of its queries refined
    body = _search(base, gallery_name, query, "search:batch", refine="kreciprocal", top_k=2, candidates=4).json()
    assert body["candidates"] == 4 and body["candidates_used"] == 4

    # no candidates asked: the server's K (3) is raised to top_k, and the answer shows the K that ran
    body = _search(base, gallery_name, query, refine="kreciprocal", top_k=5).json()
    assert body["candidates"] == 5 and body["candidates_used"] == 5 and len(body["results"]) == 5

    # modes without candidates keep the keys they always had
    body = _search(base, gallery_name, query, refine="none", top_k=5).json()
    assert body["candidates"] is None and "candidates_used" not in body
