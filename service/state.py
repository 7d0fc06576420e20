"""Runtime state shared by the routes: settings, store, embedder, refiner, per-gallery FAISS indexes.

The FAISS indexes (:class:`service.index_cache.IndexCache`) are caches of the Redis store: loaded from their
snapshots or built from the store at start-up, kept in sync by following the store's change log (every
replica's writes, this one's included), and snapshotted to disk: :mod:`service.index_sync`,
:mod:`service.follower`. The write path stores first (durably: :mod:`index.durability`), then updates the index.

The model (bundle, encoder, refiner) and the indexes change together when another bundle is
activated, here (:mod:`service.activation`) or by another replica (:meth:`ServiceState.follow_activation`):
requests hold ``model_lock`` shared for their whole run so that each sees one model, and
:meth:`ServiceState.install_model` runs under it exclusively.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from index.durability import Persistence
from index.redis_server import EmbeddedRedis
from index.blas_threads import limit_blas_threads
from index.bundle import NFORMER_FILE, Bundle, BundleError, NFormerSpec, load_bundle, nformer_file
from index.refine import NeighborTransformer, Refiner
from index.store import RedisStore
from index.store_layout import migrate_layout
from index.vector_index import VectorIndex

from .embedder import Embedder
from .follower import Follower
from .index_cache import IndexCache, IndexedModel
from .index_sync import IndexSync
from .jobs import JobManager
from .model_registry import DEFAULT_BUNDLE_ID, bundle_dir, resolve_active
from .refine_auto import RefineAdvisor
from .runtime import encoder_threads
from .rwlock import RWLock
from .settings import RefineMode, Settings

log = logging.getLogger("reid.service")


def load_refiner(bundle: Bundle, settings: Settings) -> Refiner:
    """A `Refiner` with the bundle's NFormer when it ships ``nformer.onnx`` (else NFormer-less): its int8 graph
    when ``refine_precision`` is int8 and the bundle ships one."""
    name = nformer_file(bundle.card.get("files", {}), settings.refine_precision)
    nformer = None
    if name is not None:
        path = bundle.path / name
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
    #: refine=auto's per-gallery decisions (made from each gallery's features, remade when stale)
    refine_advisor: RefineAdvisor = field(init=False)
    redis_server: EmbeddedRedis | None = None
    #: gallery -> FAISS index, of the served model (made at start, once the model is loaded)
    index_cache: IndexCache | None = None
    startup_error: str | None = None
    jobs: JobManager | None = None
    #: how Redis persists acknowledged writes (probed at start; /readyz shows it)
    persistence: Persistence | None = None
    sync: IndexSync | None = None
    follower: Follower | None = None
    #: set when another replica activated a model this process cannot load (/readyz reports it)
    model_problem: str | None = None
    #: set when this process's blob directory is not the one the store's kept bytes are in (/readyz reports it)
    storage_problem: str | None = None
    #: shared by every request that uses the model or the indexes; exclusive to switch the model
    model_lock: RWLock = field(default_factory=RWLock)

    def __post_init__(self) -> None:
        self.refine_advisor = RefineAdvisor(self.settings.refine_auto_mode, self.settings.refine_auto_threshold)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        s = self.settings
        limit_blas_threads()
        if s.redis_url:
            url = s.redis_url
        else:
            self.redis_server = EmbeddedRedis(s.redis_data_dir, appendfsync=s.redis_appendfsync).start()
            url = self.redis_server.url
            log.info("embedded redis-server on %s (AOF in %s, appendfsync %s)", url, s.redis_data_dir,
                     s.redis_appendfsync)
        self.store = RedisStore(url, **s.store_options())
        self._wait_for_store()  # the active bundle's id is kept in Redis
        migrate_layout(self.store)  # a store of the previous key layout is renamed once, here
        self._check_durability()
        self.storage_problem = self.store.check_blob_dir()
        if self.storage_problem:
            log.error("%s", self.storage_problem)
        self._note_bytes_in_redis()
        self.bundle_id, self.bundle = resolve_active(self.store, s)
        recorded = self.recorded_active_bundle()
        if recorded != self.bundle_id:  # resolve_active fell back: the stored vectors are of another model
            self.model_problem = (f"the active model bundle {recorded!r} (recorded in Redis) cannot be loaded here; "
                                  f"serving {self.bundle_id!r}, whose features do not match the stored vectors")
        self.embedder, self.refiner, self.refine_default = self.load_model(self.bundle)
        s.index_spec.check(self.embedder.dim)  # e.g. REID_INDEX_PQ_M must divide the embedding dimension
        log.info("model %s = %s (dim %d) on %s", self.bundle_id, self.bundle.model_id, self.embedder.dim,
                 self.embedder.providers)
        self.jobs = JobManager(self.store.job_store())
        self.jobs.fail_orphans()  # jobs a crashed predecessor left "running" would hold their kind for a while
        self.index_cache = IndexCache(self.store, s.index_spec,
                                      IndexedModel(self.bundle_id, self.bundle.model_id, self.embedder.dim))
        self.sync = IndexSync(self.store, s, self.index_cache, self.follow_activation)
        self.sync.load()  # snapshots + change-log replay, or rebuilds from Redis; never re-embeds
        self.start_follower()

    def start_follower(self) -> Follower:
        """Follow the change log (every replica's writes and activations) in a thread of its own."""
        self.follower = Follower(self.store, self.sync, self.follow_activation,
                                 events_maxlen=self.settings.events_maxlen, redis_server=self.redis_server).start()
        return self.follower

    def _check_durability(self) -> None:
        s = self.settings
        self.persistence = p = self.store.probe_persistence(s.redis_appendfsync)
        if p.use_waitaof:
            self.store.wait_aof_ms = s.waitaof_timeout_ms
            log.info("Redis %s runs appendfsync %s: every write waits for its AOF fsync (WAITAOF)", p.version,
                     p.appendfsync)
        if self.store.wait_replicas:
            log.info("every write waits until %d replica(s) hold it (WAIT, up to %d ms): a failover to one of "
                     "them loses no acknowledged image", self.store.wait_replicas, self.store.wait_replicas_ms)
        if p.warning:
            # an explicit REID_REDIS_APPENDFSYNC=everysec accepted the loss window: say it, do not warn
            (log.info if s.redis_appendfsync == "everysec" else log.warning)("durability: %s", p.warning)

    def _note_bytes_in_redis(self) -> None:
        """Say so when kept bytes still sit in Redis (written before the blob store) while new ones go to disk:
        they are served from Redis until ``reid migrate-store --blobs`` moves them."""
        if self.settings.image_storage != "disk":
            return
        in_redis = self.store.image_bytes_in_redis()
        if in_redis:
            log.info("%d image(s) in %d gallery(ies) keep their bytes inside Redis (the layout before the blob "
                     "store); `reid migrate-store --blobs` moves them to %s", sum(in_redis.values()), len(in_redis),
                     self.settings.blob_path)

    def load_model(self, bundle: Bundle) -> tuple[Embedder, Refiner, str]:
        """The bundle's encoder, refiner and the refine default it can honour (BundleError if unusable)."""
        s = self.settings
        embedder = Embedder(bundle, threads=encoder_threads(s.ort_threads, s.embed_workers),
                            batch_size=s.embed_batch_size, spin=s.ort_spin)
        refiner = load_refiner(bundle, s)
        refine_default = s.refine_default
        if RefineMode(refine_default).needs_nformer and refiner.nformer is None:
            # Keep serving: a default the bundle cannot honour must not turn every search into an error.
            log.warning("REID_REFINE_DEFAULT=%s but model %s has no %s: searches default to refine=none",
                        s.refine_default, bundle.model_id, NFORMER_FILE)
            refine_default = "none"
        log.info("model %s: nformer %s, default refine=%s, K=%d", bundle.model_id,
                 refiner.nformer.path.name if refiner.nformer is not None else "absent", refine_default,
                 s.refine_candidates)
        return embedder, refiner, refine_default

    def install_model(self, bundle_id: str, bundle: Bundle, embedder: Embedder, refiner: Refiner,
                      refine_default: str, indexes: dict[str, VectorIndex]) -> None:
        """Serve another model with indexes already built from its vectors. Hold ``model_lock`` exclusively."""
        self.bundle_id, self.bundle, self.embedder = bundle_id, bundle, embedder
        self.refiner, self.refine_default = refiner, refine_default
        self.sync.install(IndexedModel(bundle_id, bundle.model_id, embedder.dim), indexes)

    def recorded_active_bundle(self) -> str:
        """The bundle recorded as active in Redis: the one whose vectors the store holds. When it is not the one
        served here, another replica activated it (and this one has not followed yet, or cannot load it)."""
        return self.store.active_bundle() or DEFAULT_BUNDLE_ID

    def follow_activation(self) -> bool:
        """Serve the bundle recorded as active in Redis if it is not the one served here (another replica activated
        it). Its vectors are already in the store: the indexes are rebuilt from them, nothing is re-embedded.
        Returns True if the model was switched."""
        target = self.recorded_active_bundle()
        with self.model_lock.shared():  # an activation of this very process holds it until it has switched
            if target == self.bundle_id:
                self.model_problem = None
                return False
        try:
            bundle = load_bundle(bundle_dir(self.settings, target))
            embedder, refiner, refine_default = self.load_model(bundle)
        except (BundleError, ValueError) as e:
            self.model_problem = (f"model bundle {target!r} was activated by another replica but cannot be loaded "
                                  f"here ({e}); still serving {self.bundle_id!r}, whose features do not match the "
                                  "stored vectors")
            log.error("%s", self.model_problem)
            return False
        log.info("model %s was activated elsewhere: rebuilding the indexes from its stored vectors", target)
        indexes = {g: self.index_cache.build(g, embedder.dim) for g in self.store.list_galleries()}
        with self.model_lock.exclusive():
            self.install_model(target, bundle, embedder, refiner, refine_default, indexes)
        self.model_problem = None
        log.info("now serving model %s (%s), activated by another replica", target, bundle.model_id)
        return True

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
        if self.follower is not None:
            self.follower.stop()
            self.follower = None
        if self.sync is not None and self.embedder is not None:
            try:
                self.sync.snapshot("shutdown")  # the next start loads these instead of rebuilding
            except Exception:  # a full disk must not keep the process (and its Redis) from stopping
                log.exception("could not write the index snapshots at shutdown")
        if self.store is not None:
            self.store.close()
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None

    @property
    def has_nformer(self) -> bool:
        return self.refiner.nformer is not None

    def auto_refine(self, gallery: str):
        """refine=auto's decision for the gallery under the served model (service/refine_auto.py)."""
        return self.refine_advisor.decide(gallery, self.index_for(gallery), self.bundle.model_id, self.has_nformer)

    # ------------------------------------------------------------------ indexes
    @property
    def indexes(self) -> dict[str, VectorIndex]:
        """Gallery -> index, as they are now (a copy)."""
        return self.index_cache.all() if self.index_cache is not None else {}

    def index_for(self, gallery: str, create: bool = False) -> VectorIndex | None:
        """The gallery's index; built from the store if the gallery exists there but not here."""
        return self.index_cache.index_for(gallery, create)

    def galleries_of_another_model(self) -> dict[str, str]:
        """Gallery -> the model its stored vectors are of, for the galleries whose recorded model is not the one
        served here (galleries without a record are not counted)."""
        if self.store is None or self.bundle is None:
            return {}
        return {g: m for g, m in self.store.gallery_models().items() if m and m != self.bundle.model_id}

    def sync_status(self) -> tuple[bool, list[str]]:
        """Follower connected and caught up, every index's count equal to the store's. Returns (in_sync, problems)."""
        problems: list[str] = []
        if self.model_problem:
            problems.append(self.model_problem)
        if self.storage_problem:
            problems.append(self.storage_problem)
        stale = self.galleries_of_another_model()
        if stale:
            named = ", ".join(f"{g} ({m})" for g, m in sorted(stale.items())[:5]) + (" …" if len(stale) > 5 else "")
            problems.append(f"{len(stale)} gallery(ies) hold vectors of another model than the one served "
                            f"({self.bundle.model_id}): {named}; their searches would compare features of two "
                            f"models (was the default bundle replaced by an upgrade?). POST "
                            f"/v1/models/{self.bundle_id}/activate re-embeds them from their kept images")
        interrupted = self.store.interrupted_activation() if self.store is not None else None
        if interrupted and not any(j["kind"] == "activate" for j in self.jobs.store.active()):
            problems.append(f"an activation of model bundle {interrupted!r} stopped part-way (Redis Cluster switches "
                            "galleries one at a time): some galleries hold its vectors while another bundle is "
                            f"active; activate {interrupted!r} again to finish")
        if self.follower is not None:
            if not self.follower.alive:
                problems.append("the change-log follower thread has stopped")
            elif not self.follower.connected:
                problems.append(f"reconnecting to the change log: {self.follower.error}")
        if self.sync is not None and not self.sync.wait_caught_up(1.0):
            problems.append(f"the index is behind the change log (applied up to {self.sync.applied})")
        if problems:
            return False, problems
        for attempt in range(3):  # writes racing with the comparison: look again before reporting
            in_sync, problems = self._compare_counts()
            if in_sync:
                break
            time.sleep(0.05)
        return in_sync, problems

    def _compare_counts(self) -> tuple[bool, list[str]]:
        counts = self.store.counts()
        problems = []
        for g in counts:
            if self.index_cache.get(g) is None:  # created by another writer: build it now from the store
                self.index_for(g)
        sizes = self.index_cache.sizes()
        for g, n in counts.items():
            have, skipped = sizes.get(g, (0, 0))
            if have != n:
                problems.append(f"gallery {g}: index has {have} vectors, store has {n}"
                                + (f" ({skipped} from another model)" if skipped else ""))
        for g in set(sizes) - set(counts):
            if sizes[g][0]:
                problems.append(f"gallery {g}: in the index but not in the store")
        return (not problems, problems)

    def index_refresh(self, gallery: str, ids) -> None:
        """Bring these images' index entries in line with the store now (read-your-writes for this process's
        own changes; the follower applies them again, idempotently)."""
        self.sync.refresh(gallery, ids)


def new_state(settings: Settings | None = None) -> ServiceState:
    return ServiceState(settings=settings or Settings())
