"""Service settings (environment variables with the ``REID_`` prefix, or a ``.env`` file).

    REID_DATA_DIR=./data/reid          where embedded Redis keeps its AOF and index snapshots live
    REID_REDIS_URL=redis://host:6379/0 external Redis; unset = start an embedded redis-server
    REID_REDIS_CLUSTER=true            REID_REDIS_URL names one node of a Redis Cluster (the client finds the rest)
    REID_REDIS_WAIT_REPLICAS=1         acknowledge a write only once this many replicas hold it (default: 1 on a
                                       cluster, 0 otherwise)
    REID_MODEL_DIR=path/to/bundle      model bundle (model.json + encoder.onnx); default: bundled one
    REID_API_KEY=secret                optional: /v1/* then requires the X-API-Key header (a read-write key)
    REID_API_KEYS_READ='["k1"]'        keys that may only read (GET); REID_API_KEYS_WRITE: keys that may also write
    REID_METRICS_REQUIRE_KEY=true      /metrics then needs X-API-Key too (any configured key; needs one)
    REID_CORS_ORIGINS='["https://a"]'  CORS is off unless origins are listed here
    REID_REFINE_DEFAULT=auto           search-time refinement when a request names none
                                       (none/local/joint/kreciprocal/local_kreciprocal/auto)
    REID_KEEP_IMAGES=true              keep each accepted image's bytes (needed to adapt and re-embed)
    REID_IMAGE_STORAGE=disk            kept bytes go to the blob store on disk (default) or, as before, into Redis
    REID_BLOB_DIR=/shared/blobs        the blob store; default {data_dir}/blobs (replicas: a shared volume)
    REID_STORE_DTYPE=float32           stored vectors in Redis: float32 or float16 (half the bytes; new galleries)
    REID_ADAPT_MIN_IMAGES=64           POST /v1/galleries/{g}/adapt needs at least this many kept images
    REID_ADAPT_EXTRA_ARGS='["--threads","4"]'  extra arguments for the `reid adapt` it runs
    REID_REDIS_APPENDFSYNC=always      acknowledged = fsynced (default); everysec: faster, may lose ~1 s on a crash
    REID_SNAPSHOT_INTERVAL_S=60        snapshot changed galleries' FAISS indexes this often (0: only at shutdown)
    REID_EVENTS_MAXLEN=100000          approximate length cap of each change log (the global one, each gallery's)
    REID_INDEX_TYPE=flat               flat (exact) | ivf_flat | hnsw | ivf_pq, with REID_INDEX_* parameters
    REID_RETENTION_SWEEP_INTERVAL_S=3600  how often galleries' retention_days are enforced

The active model is REID_MODEL_DIR until a bundle under ``{data_dir}/bundles/`` is activated
(``POST /v1/models/{id}/activate``); the choice is kept in Redis and survives restarts.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from index.index_factory import IndexSpec


# index/refine.py's MODES plus auto (tests/test_service_refine.py keeps the two in step); the docstring is
# what OpenAPI shows
class RefineMode(str, Enum):
    """A search's re-ranking mode: none, joint, local, kreciprocal or local_kreciprocal (k-reciprocal
    re-ranking of the NFormer-refined candidates), or auto (the service picks one per gallery from its own
    features)."""
    none = "none"
    joint = "joint"
    local = "local"
    kreciprocal = "kreciprocal"
    local_kreciprocal = "local_kreciprocal"
    auto = "auto"

    def __str__(self) -> str:  # the value in messages and f-strings, on every Python version
        return self.value

    @property
    def needs_nformer(self) -> bool:
        """Runs the bundle's nformer.onnx (the other modes work with any bundle)."""
        return self in (RefineMode.joint, RefineMode.local, RefineMode.local_kreciprocal)

    @property
    def refines_candidates(self) -> bool:
        """Re-ranks each query's K FAISS candidates (K: a request's candidates or REID_REFINE_CANDIDATES)."""
        return self in (RefineMode.local, RefineMode.kreciprocal, RefineMode.local_kreciprocal)


DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "default_bundle"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REID_", env_file=".env", extra="ignore",
                                      protected_namespaces=())

    data_dir: Path = Field(Path("./data/reid"), description="Data directory (embedded Redis AOF, snapshots)")
    redis_url: str | None = Field(None, description="External Redis URL; None starts an embedded redis-server "
                                                    "under data_dir/redis")
    redis_cluster: bool = Field(False, description="redis_url names one node of a Redis Cluster: the store spreads "
                                                   "galleries over its masters (each gallery's keys in one slot)")
    redis_wait_replicas: int | None = Field(
        None, ge=0, description="acknowledge a write only once this many replicas hold it (WAIT), so a failover "
                                "loses no acknowledged image; default 1 on a cluster (every master has a replica), "
                                "0 otherwise")
    redis_wait_ms: int = Field(2000, gt=0, description="how long a write waits for its replicas; after that it is "
                                                       "a 503 (it is applied, and a retry is idempotent)")
    model_dir: Path = Field(DEFAULT_BUNDLE_DIR, description="Model bundle directory")

    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Max request body size (bytes)")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Max decoded pixels per image")
    max_files_per_request: int = Field(256, gt=0)
    max_top_k: int = Field(1000, gt=0)
    ort_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0 = ORT default)")
    ort_spin: bool = Field(False, description="let the encoder's idle ORT threads busy-wait for the next run: 4% "
                                              "faster alone, but 8% slower ingest over HTTP on 2 cores, where "
                                              "decoding requests need those cycles")
    embed_batch_size: int = Field(32, gt=0)
    embed_workers: int = Field(1, ge=1, le=64, description="encoder runs in flight at once, each on cores/workers "
                               "ORT threads (when ort_threads is 0). 2 on a 2-core ingest node: ~7% more images/s "
                               "over HTTP (a decoding request stalls one run, not both cores' shared run), but "
                               "one image embeds in 4.0 ms instead of 2.4")

    # Search-time refinement (index/refine.py). "auto" decides per gallery from its own features whether
    # refinement pays (service/refine_auto.py, docs/refine-auto.md).
    refine_default: RefineMode = Field(RefineMode.auto, description="refine mode when a request names none")
    refine_auto_mode: Literal["local", "kreciprocal", "local_kreciprocal"] = Field(
        "local_kreciprocal", description="what refine=auto applies to a gallery it finds multi-shot (a model "
        "without an NFormer gets kreciprocal). local_kreciprocal: the best multi-shot mode measured "
        "(docs/refine-combinations.md, split 1: CUHK03 59.8 mAP against 57.0 for kreciprocal and 49.4 for "
        "local at K = 200)")
    refine_auto_threshold: float = Field(0.25, description="refine=auto: the neighbour_excess at or above which a "
                                                          "gallery counts as multi-shot (docs/refine-auto.md)")
    refine_candidates: int = Field(200, ge=1, le=2000, description="K: FAISS candidates that local/kreciprocal/"
                                                                  "local_kreciprocal refine (a request may "
                                                                  "override it)")
    refine_expand: int = Field(0, ge=0, le=100, description="local/kreciprocal/local_kreciprocal: also refine "
                                                          "each candidate's own nearest gallery neighbours "
                                                          "(0 = off)")
    refine_precision: Literal["int8", "fp32"] = Field("int8", description="NFormer graph that refines: the "
                                                      "bundle's nformer.int8.onnx (about 1.5x faster, cosine "
                                                      "0.9999 to fp32) when it ships one, else nformer.onnx")
    joint_max_gallery: int = Field(20000, gt=0, description="joint refuses galleries larger than this (its cost "
                                                            "grows with the gallery; use local)")
    max_batch_queries: int = Field(32, gt=0, description="max query images per search:batch request")

    api_key: str | None = Field(None, description="If set, /v1/* requires header X-API-Key; this key may read and write")
    api_keys_read: list[str] = Field(default_factory=list, description="API keys that may only read (GET/HEAD); "
                                     "JSON list. Any configured key makes /v1/* require X-API-Key")
    api_keys_write: list[str] = Field(default_factory=list, description="API keys that may read and write "
                                      "(POST/PATCH/DELETE); JSON list")
    metrics_require_key: bool = Field(False, description="GET /metrics needs X-API-Key too (a read key is "
                                      "enough); its labels name galleries and routes. Off: open to scrapers")
    cors_origins: list[str] = Field(default_factory=list, description="CORS: browser origins allowed to call the "
                                    "API (JSON list, explicit origins); empty = CORS off")

    # Back-pressure: embedding work is bounded; past the bound requests are answered at once, never left to hang.
    max_inflight: int = Field(8, ge=1, description="requests doing embedding work (search, upload) at once")
    max_queued: int = Field(32, ge=0, description="requests waiting for an embedding slot; more get 429")
    queue_timeout_s: float = Field(10.0, gt=0, description="a request that waited this long for a slot gets 503")
    request_timeout_s: float = Field(120.0, gt=0, description="answer 503 request_timeout after this long "
                                                             "(the work in its thread still finishes)")

    # Micro-batching: concurrent requests' images are embedded together (service/batcher.py).
    batch_max_size: int = Field(32, ge=1, description="images per micro-batch at most")
    batch_max_delay_ms: float = Field(5.0, ge=0, description="wait this long for more requests before a "
                                                             "micro-batch runs (0: no waiting)")

    # Bulk imports (service/imports.py, service/archive.py).
    import_max_members: int = Field(10_000, ge=1, description="images per import (archive members or files)")
    import_max_uncompressed_bytes: int = Field(512 * 1024 * 1024, gt=0, description="total uncompressed size "
                                               "of an archive's members (zip bombs)")
    import_chunk: int = Field(32, ge=1, description="images ingested per step of an import job")
    job_max_errors: int = Field(100, ge=1, description="per-item errors a job record keeps")

    # Same-person decisions and evaluation (service/calibration.py, service/evaluation.py).
    calibrate_max_images: int = Field(4000, ge=2, description="labeled images sampled for calibration")
    calibrate_max_pairs: int = Field(1_000_000, ge=100, description="impostor pairs sampled for calibration")
    evaluate_max_images: int = Field(20_000, ge=2, description="labeled gallery images an evaluation may use")
    thumbnail_size: int = Field(128, ge=16, le=512, description="longest side of thumbnails (pixels)")

    # Model adaptation and activation (service/adapt.py, service/activation.py).
    keep_images: bool = Field(True, description="keep each accepted image's original bytes (where: image_storage); "
                                                "adapting a model to a gallery and activating another model need "
                                                "them, and thumbnails show them")
    image_storage: Literal["disk", "redis"] = Field(
        "disk", description="disk: kept bytes go to the content-addressed blob store under blob_dir (fsynced before "
                            "the image is acknowledged), referenced from Redis; redis: inside Redis as before the "
                            "blob store (for replicas that cannot share a volume; every byte costs Redis RAM). "
                            "Either way bytes are read from wherever they are (`reid migrate-store --blobs` moves "
                            "the ones in Redis to disk)")
    blob_dir: Path | None = Field(None, description="the blob store's folder (default {data_dir}/blobs); every API "
                                                    "replica must see the same one (a shared volume)")
    store_dtype: Literal["float32", "float16"] = Field(
        "float32", description="how vectors are stored in Redis (the FAISS indexes and search stay float32): float16 "
                               "halves their bytes for a mAP change within ±0.1 point on the shipped model "
                               "(README, Sizing). Applies to galleries created from now on and to every gallery "
                               "at the next model activation; each gallery records its own")
    adapt_min_images: int = Field(64, ge=1, description="adapting refuses galleries with fewer kept images")
    adapt_extra_args: list[str] = Field(default_factory=list, description="extra arguments for `reid adapt` "
                                        "(JSON list, e.g. [\"--threads\", \"4\"]); see `reid adapt --help`")

    # Durability, snapshots and replicas (index/durability.py, index/snapshot.py, service/follower.py).
    redis_appendfsync: Literal["always", "everysec"] = Field(
        "always", description="always: an image is acknowledged only once Redis has fsynced it (the embedded "
                              "server runs appendfsync always; an external one gets WAITAOF if it runs everysec); "
                              "everysec: the embedded server runs appendfsync everysec and a crash of Redis or of "
                              "its host may lose the images acknowledged in the last ~1 s (up to 2 s)")
    waitaof_timeout_ms: int = Field(2000, gt=0, description="WAITAOF timeout; a write not fsynced by then is a 503")
    snapshots: bool = Field(True, description="write FAISS snapshots under data_dir/index and load them at start")
    snapshot_interval_s: float = Field(60.0, ge=0, description="snapshot galleries that changed this often "
                                                               "(0: only at clean shutdown)")
    snapshot_changes: int = Field(50_000, gt=0, description="also snapshot once this many changes were applied")
    events_maxlen: int = Field(100_000, ge=1000, description="approximate cap of each change-log stream (the "
                                                              "global one and each gallery's); a replica that falls "
                                                              "further behind in one rebuilds from Redis")

    # Index types (index/index_factory.py). index_* settings also key the snapshots' manifests.
    index_type: Literal["flat", "ivf_flat", "hnsw", "ivf_pq"] = Field(
        "flat", description="flat: exact; ivf_flat / ivf_pq: inverted lists (PQ-compressed), trained once a gallery "
                            "holds index_train_threshold vectors (exact until then); hnsw: graph")
    index_nlist: int = Field(1024, ge=1, description="IVF cells (about sqrt(N) to 4*sqrt(N))")
    index_nprobe: int = Field(32, ge=1, description="IVF cells searched per query (recall vs latency)")
    index_hnsw_m: int = Field(32, ge=2, le=256, description="HNSW links per node")
    index_hnsw_ef_search: int = Field(128, ge=1, description="HNSW search beam (raised to k when k is larger)")
    index_hnsw_ef_construction: int = Field(200, ge=1, description="HNSW build beam")
    index_pq_m: int = Field(32, ge=1, description="ivf_pq: sub-quantizers (bytes per vector at 8 bits); must divide "
                                                  "the embedding dimension")
    index_pq_nbits: int = Field(8, ge=1, le=16, description="ivf_pq: bits per sub-quantizer code")
    index_pq_refine: int = Field(4, ge=0, description="ivf_pq: re-rank pq_refine*k candidates by their exact "
                                                      "vectors read from Redis (0: PQ scores as they are)")
    index_train_threshold: int = Field(50_000, ge=1, description="IVF types: vectors a gallery needs before its "
                                                                 "IVF index is trained (in the background)")
    index_tombstone_ratio: float = Field(0.2, gt=0, lt=1, description="hnsw: rebuild the graph when removed "
                                                                      "entries pass this share")
    index_gpu: Literal["auto", "off"] = Field("auto", description="auto: search a GPU copy of each index when FAISS "
                                                                   "sees a GPU (faiss-gpu); off: CPU only")
    index_gpu_min_vectors: int = Field(10_000, ge=0, description="galleries smaller than this search on the CPU")

    # Deletion and retention (service/deletion.py, service/retention.py).
    retention_sweep_interval_s: float = Field(3600.0, gt=0, description="how often expired images of galleries "
                                                                        "with retention_days are deleted")
    delete_batch_size: int = Field(500, ge=1, le=10_000, description="images per Redis transaction when deleting "
                                                                     "many")
    vector_compaction_min_pages: int = Field(4, ge=0, description="at each retention sweep, compact the vector "
                                             "pages of every gallery in which this many pages (256 KiB each) could "
                                             "be freed (deletes leave pages half empty; 0: never)")

    host: str = "127.0.0.1"
    port: int = 8000

    @model_validator(mode="after")
    def _metrics_key_exists(self) -> "Settings":
        # asked for but impossible: /metrics would stay open, the opposite of what was configured
        if self.metrics_require_key and not (self.read_keys or self.write_keys):
            raise ValueError("REID_METRICS_REQUIRE_KEY needs a key: set REID_API_KEY, REID_API_KEYS_READ or "
                             "REID_API_KEYS_WRITE")
        return self

    @property
    def read_keys(self) -> list[str]:
        return [k for k in self.api_keys_read if k]

    @property
    def write_keys(self) -> list[str]:
        return [k for k in [self.api_key, *self.api_keys_write] if k]

    @property
    def redis_data_dir(self) -> Path:
        return Path(self.data_dir) / "redis"

    @property
    def blob_path(self) -> Path:
        """The blob store's folder: blob_dir, else {data_dir}/blobs."""
        return Path(self.blob_dir) if self.blob_dir is not None else Path(self.data_dir) / "blobs"

    def store_options(self) -> dict:
        """The keyword arguments of :class:`index.store.RedisStore` these settings ask for."""
        waits = self.redis_wait_replicas if self.redis_wait_replicas is not None else int(self.redis_cluster)
        return dict(events_maxlen=self.events_maxlen, blob_dir=self.blob_path, image_storage=self.image_storage,
                    vector_dtype=self.store_dtype, cluster=self.redis_cluster, wait_replicas=waits,
                    wait_replicas_ms=self.redis_wait_ms)

    @property
    def snapshot_dir(self) -> Path:
        """Where each gallery's FAISS snapshot and its manifest are written."""
        return Path(self.data_dir) / "index"

    @property
    def index_spec(self) -> IndexSpec:
        """The index_* settings as the index package takes them."""
        return IndexSpec(type=self.index_type, nlist=self.index_nlist, nprobe=self.index_nprobe,
                         hnsw_m=self.index_hnsw_m, ef_search=self.index_hnsw_ef_search,
                         ef_construction=self.index_hnsw_ef_construction, pq_m=self.index_pq_m,
                         pq_nbits=self.index_pq_nbits, pq_refine=self.index_pq_refine,
                         train_threshold=self.index_train_threshold, tombstone_ratio=self.index_tombstone_ratio,
                         gpu=self.index_gpu, gpu_min_vectors=self.index_gpu_min_vectors)

    @property
    def bundles_dir(self) -> Path:
        """Where adapted model bundles are written and from where they can be activated."""
        return Path(self.data_dir) / "bundles"
