"""Runtime state shared by the routes: settings, store, embedder, refiner, per-gallery FAISS indexes.

The FAISS indexes are caches of the Redis store: built from it at start-up
(:meth:`ServiceState.rebuild`), lazily for galleries another writer created, and kept in sync
by the write path (store first, then index).

The model (bundle, encoder, refiner) and the indexes change together when another bundle is
activated (:mod:`service.activation`): requests hold ``model_lock`` shared for their whole run so
that each sees one model, and :meth:`ServiceState.install_model` runs under it exclusively.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from index.redis_server import EmbeddedRedis
from index.refine import NeighborTransformer, NFormerSpec, Refiner
from index.store import RedisStore
from index.vector_index import VectorIndex

from .bundle import Bundle, BundleError
from .embedder import Embedder
from .jobs import JobManager, JobStore
from .model_registry import DEFAULT_BUNDLE_ID, resolve_active
from .rwlock import RWLock
from .settings import Settings

log = logging.getLogger("reid.service")

#: refine modes that run the bundle's nformer.onnx (the others work with any bundle)
NFORMER_MODES = ("joint", "local")
NFORMER_FILE = "nformer.onnx"


def load_refiner(bundle: Bundle, settings: Settings) -> Refiner:
    """A `Refiner` with the bundle's NFormer when it ships ``nformer.onnx`` (else NFormer-less)."""
    path = bundle.file(NFORMER_FILE)
    nformer = None
    if path is not None:
        entry = bundle.card.get("nformer")
        if not isinstance(entry, dict):
            raise BundleError(f"model bundle {bundle.path} ships {NFORMER_FILE} but its card has no 'nformer' entry")
        try:
            spec = NFormerSpec.from_card(entry)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"model bundle {bundle.path}: bad 'nformer' card entry: {e!r}") from e
        if spec.dim != bundle.embedding_dim:
            raise BundleError(f"model bundle {bundle.path}: nformer dim {spec.dim} != embedding_dim "
                              f"{bundle.embedding_dim}")
        try:
            nformer = NeighborTransformer(path, spec, threads=settings.ort_threads)
            # Fail at load time, not on the first request, if the graph disagrees with its card.
            probe = np.eye(3, spec.dim, dtype=np.float32)
            out = nformer(probe)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"cannot run {path}: {e}") from e
        if out.shape != probe.shape:
            raise BundleError(f"{path} outputs shape {out.shape} for input {probe.shape}")
    return Refiner(nformer, candidates=settings.refine_candidates, expand=settings.refine_expand)


@dataclass
class ServiceState:
    settings: Settings
    store: RedisStore | None = None
    #: id of the served bundle (service.model_registry): "default" is settings.model_dir
    bundle_id: str = DEFAULT_BUNDLE_ID
    bundle: Bundle | None = None
    embedder: Embedder | None = None
    #: search-time refinement; its ``nformer`` is None when the bundle has no nformer.onnx
    refiner: Refiner = field(default_factory=Refiner)
    #: the refine mode of requests that name none (settings.refine_default, or "none" if the bundle cannot)
    refine_default: str = "none"
    redis_server: EmbeddedRedis | None = None
    indexes: dict[str, VectorIndex] = field(default_factory=dict)
    #: gallery -> number of stored vectors that could not be indexed (wrong dimension)
    skipped: dict[str, int] = field(default_factory=dict)
    startup_error: str | None = None
    jobs: JobManager | None = None
    #: shared by every request that uses the model or the indexes; exclusive to switch the model
    model_lock: RWLock = field(default_factory=RWLock)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        s = self.settings
        if s.redis_url:
            url = s.redis_url
        else:
            self.redis_server = EmbeddedRedis(s.redis_data_dir).start()
            url = self.redis_server.url
            log.info("embedded redis-server on %s (AOF in %s)", url, s.redis_data_dir)
        self.store = RedisStore(url)
        self._wait_for_store()  # the active bundle's id is kept in Redis
        self.bundle_id, self.bundle = resolve_active(self.store, s)
        self.embedder, self.refiner, self.refine_default = self.load_model(self.bundle)
        log.info("model %s = %s (dim %d) on %s", self.bundle_id, self.bundle.model_id, self.embedder.dim,
                 self.embedder.providers)
        self.jobs = JobManager(JobStore(self.store.r))
        self.rebuild()

    def load_model(self, bundle: Bundle) -> tuple[Embedder, Refiner, str]:
        """The bundle's encoder, refiner and the refine default it can honour (BundleError if unusable)."""
        s = self.settings
        embedder = Embedder(bundle, threads=s.ort_threads, batch_size=s.embed_batch_size)
        refiner = load_refiner(bundle, s)
        refine_default = s.refine_default
        if refine_default in NFORMER_MODES and refiner.nformer is None:
            # Keep serving: a default the bundle cannot honour must not turn every search into an error.
            log.warning("REID_REFINE_DEFAULT=%s but model %s has no %s: searches default to refine=none",
                        s.refine_default, bundle.model_id, NFORMER_FILE)
            refine_default = "none"
        log.info("model %s: nformer %s, default refine=%s, K=%d", bundle.model_id,
                 "loaded" if refiner.nformer is not None else "absent", refine_default, s.refine_candidates)
        return embedder, refiner, refine_default

    def install_model(self, bundle_id: str, bundle: Bundle, embedder: Embedder, refiner: Refiner,
                      refine_default: str, indexes: dict[str, VectorIndex]) -> None:
        """Serve another model with indexes already built from its vectors. Hold ``model_lock`` exclusively."""
        with self._lock:
            self.bundle_id, self.bundle, self.embedder = bundle_id, bundle, embedder
            self.refiner, self.refine_default = refiner, refine_default
            self.indexes = dict(indexes)
            self.skipped = {g: 0 for g in indexes}

    def _wait_for_store(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.store.ping()
                return
            except Exception as e:  # ConnectionError, BusyLoadingError, TimeoutError
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Redis store not reachable: {e}") from e
                time.sleep(0.5)

    def stop(self) -> None:
        if self.jobs is not None:
            self.jobs.shutdown()
        if self.store is not None:
            self.store.close()
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None

    @property
    def has_nformer(self) -> bool:
        return self.refiner.nformer is not None

    # ------------------------------------------------------------------ indexes
    @property
    def dim(self) -> int:
        return self.embedder.dim

    def _build(self, gallery: str) -> VectorIndex:
        idx = VectorIndex(self.dim)
        skipped = 0
        for ids, vecs in self.store.iter_vectors(gallery):
            if vecs.shape[1] != self.dim:
                skipped += len(ids)
                continue
            idx.add(ids, vecs)
        if skipped:
            log.warning("gallery %s: %d stored vectors have a different dimension than model %s; "
                        "they are not searchable (re-ingest them)", gallery, skipped, self.bundle.model_id)
        self.skipped[gallery] = skipped
        return idx

    def rebuild(self) -> None:
        """(Re)build every gallery's index from the store."""
        t0 = time.perf_counter()
        indexes = {g: self._build(g) for g in self.store.list_galleries()}
        with self._lock:
            self.indexes = indexes
        log.info("rebuilt %d gallery index(es), %d vectors, in %.2fs", len(indexes),
                 sum(len(i) for i in indexes.values()), time.perf_counter() - t0)

    def index_for(self, gallery: str, create: bool = False) -> VectorIndex | None:
        """The gallery's index; built from the store if the gallery exists there but not here."""
        with self._lock:
            idx = self.indexes.get(gallery)
            if idx is not None:
                return idx
            if self.store.gallery_exists(gallery):
                idx = self._build(gallery)
            elif create:
                idx = VectorIndex(self.dim)
            else:
                return None
            self.indexes[gallery] = idx
            return idx

    def drop_index(self, gallery: str) -> None:
        with self._lock:
            self.indexes.pop(gallery, None)
            self.skipped.pop(gallery, None)

    def sync_status(self) -> tuple[bool, list[str]]:
        """Compare every index with the store's counts. Returns (in_sync, problems)."""
        galleries = self.store.list_galleries()
        pipe = self.store.r.pipeline(transaction=False)
        for g in galleries:
            pipe.hlen(self.store.k_vectors(g))
        counts = dict(zip(galleries, (int(n) for n in pipe.execute())))
        problems = []
        for g in counts:
            if g not in self.indexes:  # created by another writer: build it now from the store
                self.index_for(g)
        with self._lock:
            for g, n in counts.items():
                idx = self.indexes.get(g)
                have = len(idx) if idx is not None else 0
                if have != n:
                    problems.append(f"gallery {g}: index has {have} vectors, store has {n}"
                                    + (f" ({self.skipped[g]} from another model)" if self.skipped.get(g) else ""))
            for g in set(self.indexes) - set(counts):
                if len(self.indexes[g]):
                    problems.append(f"gallery {g}: in the index but not in the store")
        return (not problems, problems)

    def index_add(self, gallery: str, ids: np.ndarray, vecs: np.ndarray) -> None:
        idx = self.index_for(gallery, create=True)
        idx.add(ids, vecs)


def new_state(settings: Settings | None = None) -> ServiceState:
    return ServiceState(settings=settings or Settings())
