"""Key layout 3 -> 4 on a store of realistic size: how long the migration takes and what it does to Redis memory.

    python -m bench.layout_migration                      # 100,000 images of 256-d float32, the redis-server found
    REID_REDIS_SERVER=/path/to/redis-server python -m bench.layout_migration --n 200000 --json out.json

It writes a layout-3 gallery the way that version stored one (each image's record and vector in one field of
``…:entries``, a change-log entry per image, the settings hash; :func:`index.image_record.pack_entry` is layout 3's
own codec), measures ``used_memory``, runs :func:`index.store_layout.migrate_layout` (what the service does at
start), and measures again; then it checks every image's vector and metadata against what layout 3 held.
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
from index.image_record import pack_entry
from index.redis_server import EmbeddedRedis, find_redis_server
from index.store import RedisStore
from index.store_layout import layout_of, migrate_layout


def write_layout3(store: RedisStore, n: int, dim: int, batch: int = 1000) -> dict[int, tuple[bytes, dict]]:
    """A layout-3 gallery of ``n`` images; returns id -> (vector bytes, metadata) of every 97th, to check."""
    r, g = store.r, GALLERY
    settings = store.k_gallery(g)
    r.sadd(store.k_galleries(), g)
    r.hset(settings, mapping={"name": g, "created_at": "2024-05-01T00:00:00.000Z", "vector_dtype": "float32",
                              "model": MODEL})
    rng, kept = np.random.default_rng(0), {}
    for start in tqdm(range(0, n, batch), desc="layout 3", unit="batch"):
        vecs = rng.standard_normal((min(batch, n - start), dim)).astype("<f4")
        pipe = r.pipeline(transaction=False)
        for k, v in enumerate(vecs):
            i = start + k + 1
            meta = metadata(i, "realistic")
            pipe.hset(settings + ":entries", str(i), pack_entry(1714566896789, meta, v.tobytes()))
            pipe.xadd(store.k_gallery_events(g), {"op": "put", "id": str(i)}, maxlen=store.events_maxlen,
                      approximate=True)
            if i % 97 == 0:
                kept[i] = (v.tobytes(), meta)
        pipe.execute()
    r.set(store.k_layout(), "3")
    return kept


def run(url: str, n: int, dim: int) -> dict:
    store = RedisStore(url)
    store.r.config_set("appendonly", "no")  # what is measured is what the data holds (as bench.store_memory)
    store.r.flushall()
    empty = server_used_memory(store)
    kept = write_layout3(store, n, dim)
    before = server_used_memory(store)
    t0 = time.perf_counter()
    done = migrate_layout(store)
    seconds = time.perf_counter() - t0
    after = server_used_memory(store)
    assert layout_of(store.r) == "4" and done.entries_folded == n and store.count(GALLERY) == n
    ids = sorted(kept)
    stored = store.get_raw_vectors(GALLERY, ids)[1]
    records = store.get_many(GALLERY, ids)
    same = all(v == kept[i][0] and all(rec.metadata[f] == val for f, val in kept[i][1].items())
               for i, v, rec in zip(ids, stored, records))
    store.close()
    return {"n": n, "dim": dim, "seconds": seconds, "images_per_s": n / seconds, "used_memory_before": before,
            "used_memory_after": after, "bytes_per_image_before": (before - empty) / n,
            "bytes_per_image_after": (after - empty) / n,
            "checked": len(ids), "all_equal": same, "migration": done.as_dict()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as srv:
        row = run(srv.url, args.n, args.dim)
    row["server"] = server_version(find_redis_server())
    print(f"{row['server']}\n{args.n:,} images: layout 3 -> 4 in {row['seconds']:.1f} s "
          f"({row['images_per_s']:,.0f} images/s); used_memory {row['used_memory_before'] / 2**20:,.1f} -> "
          f"{row['used_memory_after'] / 2**20:,.1f} MiB ({row['bytes_per_image_before']:,.0f} -> "
          f"{row['bytes_per_image_after']:,.0f} B per image, change log included); "
          f"{row['checked']} images checked: {'all equal' if row['all_equal'] else 'DIFFERENT'}")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")
    return 0 if row["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
