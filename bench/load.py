"""Bounded load test (`reid loadtest`): a real `reid serve` process on loopback with its embedded Redis, a
gallery preloaded with real images, then at each concurrency a fixed time of sustained mixed traffic from an
asyncio client: searches by image (most requests) and single-image ingests of new, distinct images. Reports
per concurrency: throughput, p50/p99 latency per operation, every non-2xx answer, and the server's RSS
sampled each second (memory must stay flat: growth is reported after a warm-up)."""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from service.api_process import ApiProcess, noise_images, upload

from . import data

GALLERY = "load"


async def _client(base: str, queries: list[bytes], fresh: list[bytes], deadline: float, search_share: float,
                  seed: int, out: dict) -> None:
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        while time.monotonic() < deadline:
            if rng.random() < search_share or not fresh:
                op = "search"
                files = {"file": ("q.jpg", rng.choice(queries), "application/octet-stream")}
                started = time.perf_counter()
                r = await client.post(f"/v1/galleries/{GALLERY}/search", files=files, data={"top_k": "10", "refine": "none"})
            else:
                op = "ingest"
                files = [("files", ("g.png", fresh.pop(), "application/octet-stream"))]
                started = time.perf_counter()
                r = await client.post(f"/v1/galleries/{GALLERY}/images", files=files)
            out.setdefault(op, []).append(time.perf_counter() - started)
            if r.status_code >= 300:
                out.setdefault("errors", []).append(f"{op} {r.status_code}: {r.text[:120]}")


async def _memory_sampler(api: ApiProcess, deadline: float, samples: list[int]) -> None:
    while time.monotonic() < deadline:
        samples.append(api.memory_kb()["VmRSS"])
        await asyncio.sleep(1.0)


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"count": 0}
    ms = np.array(seconds) * 1000.0
    return {"count": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


async def _phase(api: ApiProcess, concurrency: int, duration: float, queries: list[bytes], fresh: list[bytes],
                 search_share: float) -> dict:
    deadline = time.monotonic() + duration
    out: dict = {}
    rss: list[int] = []
    started = time.perf_counter()
    await asyncio.gather(_memory_sampler(api, deadline, rss),
                         *(_client(api.url, queries, fresh, deadline, search_share, seed, out)
                           for seed in range(concurrency)))
    seconds = time.perf_counter() - started
    requests = sum(len(out.get(op, [])) for op in ("search", "ingest"))
    warm = rss[len(rss) // 4:] or rss  # growth after the first quarter: allocator warm-up is not a leak
    return {"concurrency": concurrency, "seconds": seconds, "requests": requests, "requests_per_s": requests / seconds,
            "search": _percentiles(out.get("search", [])), "ingest": _percentiles(out.get("ingest", [])),
            "errors": len(out.get("errors", [])), "error_samples": out.get("errors", [])[:5],
            "rss_mb": {"start": rss[0] / 1024, "end": rss[-1] / 1024, "max": max(rss) / 1024,
                       "growth_after_warmup": (warm[-1] - warm[0]) / 1024} if rss else {}}


def run(bundle_dir: Path, duration: float = 60.0, concurrencies=(1, 4, 16), gallery_size: int = 500,
        search_share: float = 0.8, ort_threads: int = 0) -> dict:
    """Start the service, preload the gallery, run each concurrency for ``duration`` seconds."""
    queries = data.image_bytes(gallery_size) or noise_images(gallery_size, seed=1)
    expected_ingests = int(sum(concurrencies) * duration * 40 * (1 - search_share)) + 100  # generous upper bound
    fresh = noise_images(min(expected_ingests, 20_000), seed=2)
    with tempfile.TemporaryDirectory(prefix="reid-load-") as tmp:
        env = {"REID_ORT_THREADS": str(ort_threads)} if ort_threads else {}
        api = ApiProcess(Path(tmp) / "data", bundle_dir, env=env).start()
        try:
            for i in range(0, len(queries), 32):
                r = upload(api.url, GALLERY, [(f"{i + j}.jpg", b) for j, b in enumerate(queries[i:i + 32])])
                r.raise_for_status()
            phases = [asyncio.run(_phase(api, c, duration, queries, fresh, search_share)) for c in concurrencies]
        finally:
            api.stop()
    return {"duration_s": duration, "gallery_start": len(queries), "search_share": search_share, "phases": phases}


def markdown(result: dict) -> str:
    lines = [f"Load test: {result['duration_s']:.0f} s per concurrency, {100 * result['search_share']:.0f}% searches "
             f"(top 10, no refinement) / single-image ingests, gallery of {result['gallery_start']} real images "
             "at start; server RSS sampled each second.", "",
             "| clients | req/s | search p50 / p99 ms | ingest p50 / p99 ms | errors | RSS start → end MB "
             "(growth after warm-up) |", "|---|---|---|---|---|---|"]
    for p in result["phases"]:
        s, i, m = p["search"], p["ingest"], p["rss_mb"]
        fmt = lambda x: f"{x['p50_ms']:.0f} / {x['p99_ms']:.0f}" if x["count"] else "–"  # noqa: E731
        lines.append(f"| {p['concurrency']} | {p['requests_per_s']:.1f} | {fmt(s)} | {fmt(i)} | {p['errors']} | "
                     f"{m.get('start', 0):.0f} → {m.get('end', 0):.0f} ({m.get('growth_after_warmup', 0):+.0f}) |")
    return "\n".join(lines) + "\n"
