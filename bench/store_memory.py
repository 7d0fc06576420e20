"""Redis memory per stored image, measured on a real redis-server: vectors float32 vs float16, kept bytes on
disk (the blob store) vs inside Redis vs not kept.

    python -m bench.store_memory                        # 10,000 images of 256-d, the redis-server found
    REID_REDIS_SERVER=/path/to/redis-server python -m bench.store_memory --n 20000 --json out.json

For each configuration it empties the server, writes N images through :meth:`RedisStore.put_many` (batches of
100, as uploads arrive) with metadata like the service's (``realistic``: external id, camera, person, capture
time, file name; ``minimal``: file name and camera), and reports the ``used_memory`` delta per image after the
first batch, split by ``MEMORY USAGE`` into the gallery's records (each image's slot and metadata, key layout 4),
its vector pages, its kept-bytes hash (references to blobs, or the bytes themselves) and the gallery's change
log. Each change log is capped at REID_EVENTS_MAXLEN entries, so at large N its share per image fades:
``without log`` is what each further image costs once the cap is reached.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from index.redis_cluster import LocalRedisCluster
from index.redis_server import EmbeddedRedis, find_redis_server
from index.store import RedisStore, image_id

GALLERY = "cam-lobby"
BATCH = 100  #: images per put_many, as uploads arrive
MODEL = "reid-default:20261203.173520"
IMAGE_BYTES = 6_000  #: a person crop as uploaded (a 128x64 JPEG is 3-8 KB)


def metadata(i: int, profile: str) -> dict[str, str]:
    if profile == "minimal":
        return {"camera_id": str(i % 8), "filename": f"{i:06d}.jpg"}
    return {"external_id": f"site-7/cam-03/2024-05-01/{i:08d}", "camera_id": str(i % 8),
            "person_id": f"p{i % 900:04d}", "captured_at": "2024-05-01T12:34:56.789Z",
            "filename": f"{i:04d}_c3s1_{i * 7:06d}_00.jpg"}


def image(i: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, IMAGE_BYTES, dtype=np.uint8).tobytes()


def _servers(store: RedisStore, masters_only: bool = False) -> list:
    """A client per server: the one server, or each node of the cluster (its masters: where the data is counted
    once; a replica holds a copy of its master's)."""
    if not store.cluster:
        return [store.r]
    nodes = store.r.get_primaries() if masters_only else store.r.get_nodes()
    return [store.r.get_redis_connection(node) for node in nodes]


def _used_memory(store: RedisStore) -> int:
    """``used_memory`` of the masters, less their replication backlogs: a ring buffer of ``repl-backlog-size`` (1 MB)
    per master with replicas, which Redis 6.2 allocates whole up front and Redis 7 as writes fill it, so on 7 it
    would count as ~100 B per image over the first 10,000."""
    info = [r.info("memory") for r in _servers(store, masters_only=True)]
    return sum(int(i["used_memory"]) - int(i.get("mem_replication_backlog", 0)) for i in info)


def measure(url: str, blob_dir: Path, n: int, dim: int, dtype: str, storage: str, profile: str,
            cluster: bool = False) -> dict:
    store = RedisStore(url, blob_dir=blob_dir if storage == "disk" else None,
                       image_storage="redis" if storage == "redis" else None, vector_dtype=dtype, cluster=cluster)
    r = store.r
    for server in _servers(store):
        # no append-only file while measuring: its buffers (and the rewrites that tens of MB of writes set off)
        # would count in used_memory; what is measured is what the data holds
        server.config_set("appendonly", "no")
        if server.info("replication")["role"] == "master":
            server.flushall()
        _purge(server)
    rng = np.random.default_rng(0)
    before = baseline = None
    for start in range(0, n, BATCH):
        idx = range(start, min(start + BATCH, n))
        data = [image(i) for i in idx] if storage != "none" else [str(i).encode() for i in idx]
        vecs = rng.standard_normal((len(idx), dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        store.put_many(GALLERY, [(image_id(GALLERY, d), v, metadata(i, profile)) for i, d, v in zip(idx, data, vecs)],
                       model=MODEL, images=data if storage != "none" else None)
        if before is None:
            # the baseline after the first batch: a connection's first big write grows buffers (the query buffer a
            # batch's arguments arrive in, ~0.4 MB) that stay as they are however many images follow
            for server in _servers(store):
                _purge(server)
            before, baseline = _used_memory(store), len(idx)
    for server in _servers(store):
        _purge(server)
    after = _used_memory(store)
    vector_keys = [*store.page_keys(GALLERY), store.k_free_slots(GALLERY), store.k_page_used(GALLERY)]
    parts = {
        "records": r.memory_usage(store.k_records(GALLERY), samples=0) / n,  # each image's slot and record
        "vectors": sum(r.memory_usage(k, samples=0) or 0 for k in vector_keys) / n,  # the pages
        "kept_bytes_hash": ((r.memory_usage(store.k_blobs(GALLERY), samples=0) or 0)
                            + (r.memory_usage(store.k_images(GALLERY), samples=0) or 0)) / n,
        "change_log": r.memory_usage(store.k_gallery_events(GALLERY), samples=0) / n,
    }
    total = (after - before) / (n - baseline)
    store.close()
    return {"layout": "cluster" if cluster else "single", "dtype": dtype, "kept_bytes": storage,
            "metadata": profile, "n": n, "dim": dim,
            "bytes_per_image": total, "without_log": total - parts["change_log"], "parts": parts}


def server_used_memory(store: RedisStore) -> int:
    """``used_memory`` of a store on one server, freed pages returned first."""
    _purge(store.r)
    return int(store.r.info("memory")["used_memory"])


def _purge(r) -> None:
    try:
        r.execute_command("MEMORY", "PURGE")  # jemalloc: return freed pages first
    except Exception:
        pass


def server_version(binary: str) -> str:
    return subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()


def markdown(rows: list[dict]) -> str:
    lines = ["| store | vectors | kept bytes | metadata | bytes / image | without log | records | vector pages "
             "| bytes hash | log |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        p = row["parts"]
        lines.append(f"| {row.get('layout', 'single')} | {row['dtype']} | {row['kept_bytes']} | {row['metadata']} | "
                     f"{row['bytes_per_image']:,.0f} | {row['without_log']:,.0f} | {p['records']:,.0f} | "
                     f"{p['vectors']:,.0f} | {p['kept_bytes_hash']:,.0f} | {p['change_log']:,.0f} |")
    return "\n".join(lines)


def _storages(profile: str, unkept_only: bool) -> tuple[str, ...]:
    if unkept_only:
        return ("none",)
    return ("none", "disk") + (("redis",) if profile == "realistic" else ())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--json", type=Path)
    p.add_argument("--cluster", action="store_true", help="also measure on a local Redis Cluster (3 masters + 3 "
                   "replicas; memory summed over the masters)")
    p.add_argument("--unkept-only", action="store_true", help="only the rows without kept bytes, realistic metadata "
                   "(a run at a large --n, where the change log's share fades)")
    args = p.parse_args(argv)
    profiles = ("realistic",) if args.unkept_only else ("realistic", "minimal")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with EmbeddedRedis(Path(tmp) / "redis", appendfsync="everysec") as srv:
            for profile in profiles:
                for dtype in ("float32", "float16"):
                    for storage in _storages(profile, args.unkept_only):
                        rows.append(measure(srv.url, Path(tmp) / f"blobs-{len(rows)}", args.n, args.dim, dtype,
                                            storage, profile))
                        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        if args.cluster:
            with LocalRedisCluster(Path(tmp) / "cluster", appendfsync="everysec") as cluster:
                for dtype in ("float32", "float16"):
                    for storage in ("none",) if args.unkept_only else ("none", "disk"):
                        rows.append(measure(cluster.url, Path(tmp) / f"blobs-{len(rows)}", args.n, args.dim, dtype,
                                            storage, "realistic", cluster=True))
                        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    version = server_version(find_redis_server())
    print(f"\n{version}\n\n{markdown(rows)}")
    if args.json:
        args.json.write_text(json.dumps({"server": version, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
