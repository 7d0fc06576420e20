"""What `reid compact-store` gives back after a large delete, and how long it takes.

    python -m bench.compaction                        # 100,000 images of 256-d float32, half of them deleted
    REID_REDIS_SERVER=/path/to/redis-server python -m bench.compaction --n 200000 --json out.json

It writes N images through the store (realistic metadata, batches of 100), deletes a random half (as a retention
sweep or a bulk delete by filter would: deletes free slots all over the gallery's pages, so few pages empty), then
runs :meth:`RedisStore.compact_vectors`, reporting ``used_memory`` and the gallery's vector pages at each point.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.store_memory import GALLERY, MODEL, metadata, server_used_memory, server_version
from index.redis_server import EmbeddedRedis, find_redis_server
from index.store import RedisStore


def run(url: str, n: int, dim: int) -> dict:
    store = RedisStore(url)
    store.r.config_set("appendonly", "no")  # what is measured is what the data holds (as bench.store_memory)
    store.r.flushall()
    empty = server_used_memory(store)
    rng = np.random.default_rng(0)
    for start in tqdm(range(0, n, 100), desc="write", unit="batch"):
        vecs = rng.standard_normal((min(100, n - start), dim)).astype(np.float32)
        store.put_many(GALLERY, [(start + k + 1, v, metadata(start + k + 1, "realistic")) for k, v in enumerate(vecs)],
                       model=MODEL)
    written, pages_written = server_used_memory(store), int(store.r.hlen(store.k_page_used(GALLERY)))
    gone = rng.choice(np.arange(1, n + 1), n // 2, replace=False)
    for start in tqdm(range(0, len(gone), 500), desc="delete", unit="batch"):
        store.delete_many(GALLERY, gone[start:start + 500].tolist())
    deleted = server_used_memory(store)
    t0 = time.perf_counter()
    done = store.compact_vectors(GALLERY)
    seconds = time.perf_counter() - t0
    compacted = server_used_memory(store)
    kept = sorted(set(range(1, n + 1)) - set(gone.tolist()))[::97]
    all_there = all(v is not None for v in store.get_vectors(GALLERY, kept)) and store.count(GALLERY) == n - n // 2
    store.close()
    mib = 2 ** 20
    return {"n": n, "dim": dim, "deleted": n // 2, "seconds": seconds, "moved": done.moved,
            "pages": [pages_written, done.pages_before, done.pages_after],
            "used_mib": [(written - empty) / mib, (deleted - empty) / mib, (compacted - empty) / mib],
            "all_there": all_there}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as srv:
        row = run(srv.url, args.n, args.dim)
    row["server"] = server_version(find_redis_server())
    used = row["used_mib"]
    print(f"{row['server']}\n{args.n:,} images, {row['deleted']:,} deleted at random: used_memory {used[0]:,.1f} -> "
          f"{used[1]:,.1f} MiB ({row['pages'][0]} -> {row['pages'][1]} vector pages); compacted in "
          f"{row['seconds']:.1f} s ({row['moved']:,} images moved): {used[2]:,.1f} MiB, {row['pages'][2]} pages; "
          f"{'every image there' if row['all_there'] else 'IMAGES MISSING'}")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")
    return 0 if row["all_there"] else 1


if __name__ == "__main__":
    sys.exit(main())
