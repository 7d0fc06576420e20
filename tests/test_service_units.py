"""Unit tests of the serving pieces: bundle validation, preprocessing, embedder, image decoding."""

import io
import json
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from index.bundle import BundleError, load_bundle
from service.embedder import Embedder, preprocess
from service.images import ImageError, decode_image, sniff_format
from service.labels import MetadataError, build_metadata

from conftest import make_image_bytes, write_tiny_bundle

CARD_INPUT = {"height": 4, "width": 2, "channel_order": "RGB", "mean": [0.5, 0.25, 0.0], "std": [0.5, 0.25, 1.0]}


# ---------------------------------------------------------------- bundle

def test_bundle_loads_and_exposes_card(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert b.model_id == "tiny-test:0.0.1" and b.embedding_dim == 64
    assert b.input["height"] == 64 and b.encoder_path.is_file()


def test_bundle_hash_mismatch_refused(tmp_path, tiny_bundle):
    d = tmp_path / "b"
    shutil.copytree(tiny_bundle, d)
    with open(d / "encoder.onnx", "ab") as f:
        f.write(b"\0")  # one byte changed -> sha256 differs
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(d)


def test_bundle_missing_file_and_bad_card(tmp_path, tiny_bundle):
    d = tmp_path / "b"
    shutil.copytree(tiny_bundle, d)
    card = json.loads((d / "model.json").read_text())
    card["files"]["nformer.onnx"] = "0" * 64
    (d / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="nformer.onnx.*missing"):
        load_bundle(d)
    del card["files"]["nformer.onnx"]
    card["input"]["mean"] = [0.5, 0.5]
    (d / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="input.mean"):
        load_bundle(d)
    (d / "model.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(d)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")


def test_embedder_refuses_card_with_wrong_dim(tmp_path):
    d = write_tiny_bundle(tmp_path / "b", dim=32)
    card = json.loads((d / "model.json").read_text())
    card["embedding_dim"] = 48  # the graph outputs 32
    (d / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="embedding_dim=48"):
        Embedder(d)


# ---------------------------------------------------------------- preprocessing / embedder

def test_preprocess_resizes_scales_and_normalises():
    im = Image.new("RGB", (10, 20), (255, 128, 0))
    x = preprocess(im, CARD_INPUT)
    assert x.shape == (3, 4, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], (1.0 - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_allclose(x[1], (128 / 255 - 0.25) / 0.25, atol=1e-6)
    np.testing.assert_allclose(x[2], 0.0, atol=1e-6)
    # arrays and other modes give the same result as the RGB PIL image
    np.testing.assert_allclose(preprocess(np.asarray(im), CARD_INPUT), x)
    np.testing.assert_allclose(preprocess(im.convert("RGBA"), CARD_INPUT), x)
    bgr = preprocess(im, {**CARD_INPUT, "channel_order": "BGR", "mean": [0, 0, 0], "std": [1, 1, 1]})
    np.testing.assert_allclose(bgr[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(bgr[2], 1.0, atol=1e-6)


def test_preprocess_uses_bilinear_resize():
    arr = np.zeros((8, 4, 3), np.uint8)
    arr[:, 2:] = 255
    x = preprocess(arr, {**CARD_INPUT, "mean": [0, 0, 0], "std": [1, 1, 1]})
    expect = np.asarray(Image.fromarray(arr).resize((2, 4), Image.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(x.transpose(1, 2, 0), expect, atol=1e-6)


def test_embedder_outputs_normalised_batched_and_consistent(tiny_bundle, tmp_path):
    emb = Embedder(tiny_bundle, threads=1, batch_size=3)
    ims = [Image.open(io.BytesIO(make_image_bytes(s))) for s in range(7)]
    v = emb.embed(ims)
    assert v.shape == (7, 64) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # batching does not change results
    np.testing.assert_allclose(emb.embed(ims[2:3]), v[2:3], atol=1e-5)
    # different images -> different embeddings
    assert (v @ v.T)[0, 1] < 0.9999
    paths = []
    for s in range(7):
        p = tmp_path / f"{s}.png"
        p.write_bytes(make_image_bytes(s))
        paths.append(p)
    np.testing.assert_allclose(emb.embed_paths(paths, progress=False), v, atol=1e-5)
    assert emb.embed([]).shape == (0, 64)


# ---------------------------------------------------------------- image decoding

def test_micro_batcher_runs_workers_batches_at_once_and_hands_each_request_its_rows(tiny_bundle):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from service.batcher import MicroBatcher
    from service.runtime import encoder_threads

    embedder = Embedder(tiny_bundle, threads=1)
    both_running = threading.Barrier(2, timeout=10)  # two encoder runs must be in flight together

    class Meeting:
        """The real embedder, whose runs wait for each other: one worker could never pass the barrier."""
        dim = embedder.dim

        def preprocess(self, images):
            return embedder.preprocess(images)

        def embed_arrays(self, x):
            both_running.wait()
            return embedder.embed_arrays(x)

    batcher, meeting = MicroBatcher(max_size=1, max_delay_ms=0, workers=2), Meeting()
    images = [np.full((64, 32, 3), 40 * i, np.uint8) for i in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda im: batcher.embed(meeting, [im]), images))
    finally:
        batcher.stop()
    np.testing.assert_allclose(np.concatenate(got), embedder.embed(images), rtol=1e-5, atol=1e-6)
    assert encoder_threads(3, 2) == 3 and encoder_threads(0, 1) == 0  # configured / ORT's default
    assert encoder_threads(0, 64) == 1


def test_decode_good_formats():
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF"):
        data = make_image_bytes(1, fmt=fmt)
        assert sniff_format(data) == fmt
        im = decode_image(data)
        assert im.mode == "RGB" and im.size == (48, 96)


def test_decode_non_image_is_415():
    with pytest.raises(ImageError) as e:
        decode_image(b"%PDF-1.4 hello")
    assert e.value.status_code == 415
    with pytest.raises(ImageError) as e:
        decode_image(b"")
    assert e.value.status_code == 422


def test_decode_truncated_and_corrupt_are_422():
    data = make_image_bytes(2, fmt="JPEG")
    with pytest.raises(ImageError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.status_code == 422 and e.value.code in ("truncated_image", "invalid_image")
    png = make_image_bytes(2, fmt="PNG")
    with pytest.raises(ImageError) as e:
        decode_image(png[:8] + b"\x00" * 64)  # PNG magic, garbage body
    assert e.value.status_code == 422


def _png_header_only(w, h):
    """A PNG that claims w x h pixels (decompression-bomb shape) with a tiny body."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decode_too_many_pixels_is_413_before_decoding():
    with pytest.raises(ImageError) as e:
        decode_image(_png_header_only(20000, 20000), max_pixels=40_000_000)
    assert e.value.status_code == 413 and "pixels" in e.value.message
    with pytest.raises(ImageError) as e:
        decode_image(make_image_bytes(3), max_pixels=100)
    assert e.value.status_code == 413


def test_decode_applies_exif_orientation():
    im = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 40)


def test_decode_transparent_png_to_rgb():
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


# ---------------------------------------------------------------- metadata

def test_build_metadata():
    m = build_metadata(2, {"camera_id": "1", "person_id": None}, json.dumps([{"person_id": 5}, {"camera_id": "c2"}]))
    assert m == [{"camera_id": "1", "person_id": "5"}, {"camera_id": "c2"}]
    with pytest.raises(MetadataError, match="2 entries but 3"):
        build_metadata(3, {}, "[{}, {}]")
    with pytest.raises(MetadataError, match="not valid JSON"):
        build_metadata(1, {}, "[{")
    with pytest.raises(MetadataError, match="single file"):
        build_metadata(2, {"external_id": "x"}, None)
    with pytest.raises(MetadataError, match="ISO 8601"):
        build_metadata(1, {"captured_at": "yesterday"}, None)
    with pytest.raises(MetadataError, match="unknown keys"):
        build_metadata(1, {}, '[{"colour": "red"}]')
    assert build_metadata(1, {"captured_at": "2024-05-01T10:00:00Z"}, None) == [{"captured_at": "2024-05-01T10:00:00Z"}]
