"""Restart from a snapshot vs a rebuild from Redis: time to ready and memory, at N stored vectors.

    python -m bench.restart --n 100000                # the bundled default model (256-d)
    python -m bench.restart --n 20000 --model-dir DIR  # another bundle

N random unit vectors are written straight into Redis through the store (no embedding), plus a few real
images through the API. Then, each start a real ``reid serve`` process on the same Redis:

1. first start: no snapshot, the index is built from Redis; a clean stop writes the snapshot;
2. while it is down, 2 deletes and 3 puts (real images embedded offline) go into Redis;
3. restart: the snapshot is loaded and the 5 changes replayed from the change log (checked: the new images
   are found first, the deleted ones are gone, the counts agree; a failed check raises
   :class:`RestartCheckFailed`, so no figures are reported for a restart that lost or kept the wrong data);
4. the snapshots removed, restart again: the index is rebuilt from Redis.

Prints, for 3 and 4, the time from process start to ``/readyz`` 200, the index load time (from the log),
RSS and peak RSS (VmRSS / VmHWM from /proc). ``tests/test_restart.py`` runs it with a small N; ``reid bench``
runs it as its restart section.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from index.bundle import load_bundle
from index.redis_server import EmbeddedRedis
from index.store import RedisStore, image_id
from service.api_process import ApiProcess, noise_images, top1, upload
from service.embedder import Embedder
from service.images import decode_image

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "service" / "default_bundle"
GALLERY = "big"


class RestartCheckFailed(RuntimeError):
    """The restarted service does not hold what Redis holds: its timings would measure a wrong restart."""


def _check(ok: bool, what: str) -> None:
    # explicit, not `assert`: the checks must also run under `python -O`
    if not ok:
        raise RestartCheckFailed(what)


def fill_store(store: RedisStore, gallery: str, n: int, dim: int, model: str, batch: int = 2000,
               seed: int = 0) -> float:
    """Write ``n`` random unit vectors with minimal metadata; returns seconds taken."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        m = min(batch, n - start)
        vecs = rng.normal(size=(m, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        store.put_many(gallery, [(1_000_000_000 + start + j, vecs[j], {"camera_id": "0"}) for j in range(m)],
                       model=model)
    return time.perf_counter() - t0


def _index_seconds(log: str) -> float | None:
    found = re.findall(r"indexes ready in ([0-9.]+)s", log)
    return float(found[-1]) if found else None


def _figures(api: ApiProcess, log_before: int) -> dict:
    mem = api.memory_kb()
    return {"ready_s": round(api.ready_after, 2), "index_load_s": _index_seconds(api.log()[log_before:]),
            "rss_mb": round(mem["VmRSS"] / 1024, 1), "peak_rss_mb": round(mem["VmHWM"] / 1024, 1),
            "snapshot_loads": api.metric("reid_index_snapshot_loads_total"),
            "rebuilds": api.metric("reid_index_rebuilds_total"),
            "replayed": api.metric("reid_events_replayed_at_start_total")}


def run(n: int, model_dir: Path = DEFAULT_MODEL_DIR, work: Path | None = None, out=print) -> dict:
    bundle = load_bundle(model_dir)
    own_work = work is None
    work = Path(work or tempfile.mkdtemp(prefix="reid-restart-"))
    srv = EmbeddedRedis(work / "redis").start()
    store = RedisStore(srv.url)
    api = None
    try:
        fill_s = fill_store(store, GALLERY, n, bundle.embedding_dim, bundle.model_id)
        out(f"wrote {n} vectors of dim {bundle.embedding_dim} into Redis in {fill_s:.1f}s")
        imgs = noise_images(8, seed=5)
        log_path = work / "api.log"

        api = ApiProcess(work / "data", model_dir, redis_url=srv.url, log_path=log_path).start()
        first = _figures(api, 0)
        r = upload(api.url, GALLERY, [(f"{i}.png", b) for i, b in enumerate(imgs[:5])])
        _check(r.status_code == 201, f"upload answered {r.status_code}: {r.text}")
        api.stop()
        manifest = json.loads((work / "data" / "index" / f"{GALLERY}.json").read_text())
        _check(manifest["count"] == n + 5, f"the snapshot holds {manifest['count']} vectors, not {n + 5}")

        # while the API is down: 2 deletes, 3 puts (embedded here, as another replica would have)
        gone = [image_id(GALLERY, b) for b in imgs[:2]]
        for i in gone:
            _check(store.delete(GALLERY, i), f"image {i} to delete is not in Redis")
        emb = Embedder(bundle, threads=1)
        vecs = emb.embed([decode_image(b) for b in imgs[5:8]])
        store.put_many(GALLERY, [(image_id(GALLERY, b), v, {"camera_id": "1"}) for b, v in zip(imgs[5:8], vecs)],
                       model=bundle.model_id)

        mark = len(api.log())
        api = ApiProcess(work / "data", model_dir, redis_url=srv.url, log_path=log_path).start()
        snap = _figures(api, mark)
        found, expected = top1(api.url, GALLERY, imgs[2:8]), [image_id(GALLERY, b) for b in imgs[2:8]]
        _check(found == expected, f"kept and new images not found first after the restart: {found} != {expected}")
        _check(not set(top1(api.url, GALLERY, imgs[:2])) & set(gone), "deleted images still found after the restart")
        ready = httpx.get(f"{api.url}/readyz").status_code
        _check(ready == 200, f"/readyz answers {ready} after the restart")
        count = httpx.get(f"{api.url}/v1/galleries/{GALLERY}").json()["count"]
        _check(count == n + 6, f"the gallery counts {count} images after the restart, not {n + 6}")
        api.stop()

        shutil.rmtree(work / "data" / "index")
        mark = len(api.log())
        api = ApiProcess(work / "data", model_dir, redis_url=srv.url, log_path=log_path).start()
        rebuild = _figures(api, mark)
        api.stop()
        api = None
        result = {"n": n, "dim": bundle.embedding_dim, "model": bundle.model_id, "fill_s": round(fill_s, 1),
                  "first_start": first, "from_snapshot": snap, "rebuild_from_redis": rebuild}
        out(f"N={n}, dim {bundle.embedding_dim} ({bundle.model_id})")
        out("| start | ready after (s) | index load (s) | RSS (MB) | peak RSS (MB) |")
        out("|---|---|---|---|---|")
        for name, f in (("from snapshot + 5 replayed changes", snap), ("rebuild from Redis", rebuild)):
            out(f"| {name} | {f['ready_s']} | {f['index_load_s']} | {f['rss_mb']} | {f['peak_rss_mb']} |")
        return result
    finally:
        if api is not None:
            api.kill()
        store.close()
        srv.stop()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    result = run(args.n, args.model_dir)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
