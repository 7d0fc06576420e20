"""Ingest end to end: images/s through the HTTP API (a real `reid serve` process on embedded Redis, several
concurrent clients posting batches of real image files to the batch upload endpoint) against the encoder
alone (ONNX Runtime on preprocessed arrays, same thread settings) and decode + preprocess + encode in process."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from index.bundle import ENCODER_FILE
from service.api_process import ApiProcess, noise_images

from . import data
from .encoder import session
from .timing import rate, rate_and_cpu


def _client(url: str, gallery_prefix: str, blobs: list[bytes], requests: int, errors: list) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=300) as client:
        for r in range(requests):
            # a fresh gallery per request: ids are content hashes per gallery, a repeat would not be re-embedded
            files = [("files", (f"{i}.png", b, "application/octet-stream")) for i, b in enumerate(blobs)]
            resp = client.post(f"/v1/galleries/{gallery_prefix}-{r}/images", files=files)
            if resp.status_code != 201:
                errors.append(f"{resp.status_code}: {resp.text[:200]}")


def over_http(bundle_dir: Path, blobs: list[bytes], clients: int, requests: int, threads: int,
              workers: int = 1) -> dict:
    """images/s through a fresh server, and the server's CPU per image (API process and its redis-server) over
    the same window: against the encoder's own CPU per image it says what share of the cores the encoder gets."""
    with tempfile.TemporaryDirectory(prefix="reid-bench-ingest-") as tmp:
        api = ApiProcess(Path(tmp) / "data", bundle_dir,
                         env={"REID_ORT_THREADS": str(threads), "REID_EMBED_WORKERS": str(workers)}).start()
        try:
            _client(api.url, "warmup", blobs[:4], 1, [])
            errors: list[str] = []
            posting = [threading.Thread(target=_client, args=(api.url, f"c{c}", blobs, requests, errors))
                       for c in range(clients)]
            cpu, started = api.cpu_seconds(), time.perf_counter()
            for t in posting:
                t.start()
            for t in posting:
                t.join()
            seconds, cpu = time.perf_counter() - started, api.cpu_seconds() - cpu
        finally:
            api.stop()
    images = clients * requests * len(blobs)
    return {"clients": clients, "requests_per_client": requests, "images_per_request": len(blobs),
            "embed_workers": workers, "images": images, "seconds": seconds, "images_per_s": images / seconds,
            "server_core_ms_per_image": 1000 * cpu / images, "errors": errors[:5]}


def run(bundle_dir: Path, cfg) -> dict:
    """``cfg``: ingest_clients, ingest_requests, ingest_batch, ingest_workers, seconds, server_threads (0 = ORT
    default). Twice: the shared data's files as they are (PNG) and the same images as JPEG (q90), whose decode
    costs a fifth as much; each through a server per REID_EMBED_WORKERS value (1, the default: one encoder run
    on all cores; 2: two runs at once on a core each). The encoder-alone figure is measured once, beside all."""
    from service.embedder import Embedder
    from service.images import decode_image

    card = data.card(bundle_dir)
    blobs = data.image_bytes(cfg.ingest_batch)
    source = f"{len(blobs)} {data.PROTOCOL} image files per request"
    if not blobs:
        blobs, source = noise_images(cfg.ingest_batch, seed=0), "noise PNGs (shared data absent)"
    blobs = (blobs * (cfg.ingest_batch // len(blobs) + 1))[:cfg.ingest_batch]
    x, _ = data.images(card, cfg.ingest_batch)
    encoder = session(bundle_dir / ENCODER_FILE, threads=cfg.server_threads)
    name = encoder.get_inputs()[0].name
    encoder_only = [rate_and_cpu(lambda: encoder.run(None, {name: x}), len(x), cfg.seconds)]
    embedder = Embedder(bundle_dir, threads=cfg.server_threads, batch_size=len(blobs))
    out = {"images": source, "batch": len(blobs), "server_ort_threads": cfg.server_threads, "formats": {}}
    for fmt, files in (("png", blobs), ("jpeg", data.as_jpeg(blobs))):
        in_process = rate(lambda: embedder.embed([decode_image(b) for b in files]), len(files), cfg.seconds)
        decode, decode_ms = rate_and_cpu(lambda: [decode_image(b) for b in files], len(files), cfg.seconds)
        decoded = [decode_image(b) for b in files]
        _, preprocess_ms = rate_and_cpu(lambda: embedder.preprocess(decoded), len(files), cfg.seconds)
        http = {str(w): over_http(bundle_dir, files, cfg.ingest_clients, cfg.ingest_requests, cfg.server_threads, w)
                for w in cfg.ingest_workers}
        out["formats"][fmt] = {"bytes_per_image": sum(map(len, files)) / len(files), "decode_images_per_s": decode,
                               "decode_core_ms_per_image": decode_ms, "preprocess_core_ms_per_image": preprocess_ms,
                               "decode_and_encode_images_per_s": in_process, "http": http}
    # the baseline measured before and after: a neighbour's load only lowers it, so the higher one counts
    encoder_only.append(rate_and_cpu(lambda: encoder.run(None, {name: x}), len(x), cfg.seconds))
    enc, enc_cpu = max(encoder_only)
    out["encoder_only_images_per_s"], out["encoder_core_ms_per_image"] = enc, enc_cpu
    for f in out["formats"].values():
        f["http_over_encoder"] = {w: h["images_per_s"] / enc for w, h in f["http"].items()}
        f["best_workers"] = max(f["http_over_encoder"], key=f["http_over_encoder"].get)
    return out
