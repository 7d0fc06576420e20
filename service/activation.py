"""Activate another model bundle: re-embed every kept image with it, then switch atomically.

While the job embeds, the service keeps serving the old model: new vectors go to a staging hash per
gallery (``reid:gallery:{g}:vectors:staged``) and into fresh FAISS indexes that no request sees. Then,
holding the model lock exclusively (searches and writes wait a moment), it catches up with images
added or deleted meanwhile, replaces every gallery's vectors by the staged ones and records the new
bundle as active in ONE Redis transaction, and swaps this process's encoder, refiner and indexes.
A crash before that transaction changes nothing; after it, a restart serves the new model. On Redis Cluster the
galleries switch one transaction each (:meth:`index.store.RedisStore.commit_staged`): a crash part-way leaves
some galleries switched, which the service reports at start and in ``/readyz`` until the activation is run again.

The commit also logs an ``activate`` entry in the global change log: every other replica's follower
(:mod:`service.follower`) then loads the bundle from its own ``{data_dir}/bundles/<id>`` (or its
REID_MODEL_DIR for ``default``), rebuilds its indexes from the new stored vectors and switches
(:meth:`service.state.ServiceState.follow_activation`); a replica that lacks the bundle keeps its old model
and reports it in ``/readyz``. Restarts read ``reid:active_bundle``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from index.bundle import load_bundle
from index.store import StagingStale
from index.vector_index import VectorIndex

from .images import ImageError, decode_image
from .jobs import JobContext, JobFailed
from .model_registry import bundle_dir
from .state import ServiceState

log = logging.getLogger("reid.service")

COMMIT_ATTEMPTS = 5


def galleries_without_bytes(state: ServiceState) -> dict[str, int]:
    """Gallery -> number of its images whose bytes are not kept (they cannot be re-embedded)."""
    return state.store.images_without_bytes()


class _Reembed:
    """Embeds the kept images with the new encoder into staging (Redis) and new indexes (memory)."""

    def __init__(self, state: ServiceState, embedder):
        self.state, self.store, self.embedder = state, state.store, embedder
        self.indexes: dict[str, VectorIndex] = {}
        #: galleries already switched to the new vectors (Redis Cluster switches them one at a time)
        self.committed: set[str] = set()

    def _embed(self, gallery: str, ids: list[int], blobs: list[bytes]) -> None:
        images = []
        for id_, data in zip(ids, blobs):
            try:
                images.append(decode_image(data, max_pixels=self.state.settings.max_image_pixels))
            except ImageError as e:
                raise JobFailed(f"gallery {gallery!r}: the kept bytes of image {id_} do not decode: {e}") from e
        vecs = self.embedder.embed(images)
        self.store.stage_vectors(gallery, ids, vecs)
        self.indexes[gallery].add(np.asarray(ids, np.int64), vecs)

    def start(self, gallery: str) -> None:
        self.store.clear_staged(gallery)  # leftovers of an interrupted activation
        self.indexes[gallery] = self.state.index_cache.new_index(self.embedder.dim, gallery)

    def all_images(self, gallery: str, ctx: JobContext, done: int, total: int) -> int:
        for batch in self.store.iter_images(gallery, batch=self.embedder.batch_size):
            self._embed(gallery, [i for i, _, _ in batch], [b for _, b, _ in batch])
            done += len(batch)
            ctx.progress(0.95 * done / max(total, 1), "embed", f"re-embedded {done}/{total} images")
        return done

    def catch_up(self) -> None:
        """Make staging match the store exactly: galleries and images added or deleted meanwhile."""
        current = set(self.store.list_galleries())
        for g in set(self.indexes) - current:
            self.store.clear_staged(g)
            del self.indexes[g]
        for g in sorted(current - self.committed):
            if g not in self.indexes:
                self.start(g)
            have, staged = self.store.vector_ids(g), self.store.staged_ids(g)
            added, gone = sorted(have - staged), sorted(staged - have)
            if gone:
                self.store.unstage(g, gone)
                self.indexes[g].remove(gone)
            if added:
                blobs = self.store.get_image_bytes(g, added)
                lacking = [i for i, b in zip(added, blobs) if b is None]
                if lacking:
                    raise JobFailed(f"gallery {g!r}: {len(lacking)} image(s) added during the activation have "
                                    "no kept bytes (REID_KEEP_IMAGES=false?); nothing was changed")
                self._embed(g, added, blobs)

    def discard(self) -> None:
        for g in set(self.indexes) - self.committed:
            self.store.clear_staged(g)


def run_activation(ctx: JobContext, state: ServiceState, bundle_id: str) -> dict[str, Any]:
    """The activation job. Returns the job's result ``{bundle_id, name, version}``."""
    bundle = load_bundle(bundle_dir(state.settings, bundle_id))
    ctx.progress(0.0, "load", f"loading model {bundle.model_id}")
    embedder, refiner, refine_default = state.load_model(bundle)
    store = state.store
    work = _Reembed(state, embedder)
    committed = False
    try:
        galleries = store.list_galleries()
        total = sum(store.count_images(g) for g in galleries)
        done = 0
        for g in galleries:
            work.start(g)
            done = work.all_images(g, ctx, done, total)
        ctx.progress(0.95, "switch", "catching up with changes made meanwhile")
        work.catch_up()  # the bulk of it without blocking anyone
        watch, still_running = ctx.commit_guard()  # a cancel must abort the commit

        with state.model_lock.exclusive():
            for attempt in range(COMMIT_ATTEMPTS):
                ctx.check()
                work.catch_up()
                try:
                    store.commit_staged(list(work.indexes), bundle.model_id, bundle_id, watch=watch,
                                        precondition=still_running, committed=work.committed)
                    committed = True
                    break
                except StagingStale as e:  # another replica wrote meanwhile: catch up again
                    log.info("activation of %s: %s; retrying", bundle_id, e)
            else:
                raise JobFailed(f"the galleries kept changing; gave up after {COMMIT_ATTEMPTS} attempts")
            state.install_model(bundle_id, bundle, embedder, refiner, refine_default, work.indexes)
        log.info("activated model %s (%s) over %d galleries", bundle_id, bundle.model_id, len(work.indexes))
        return {"bundle_id": bundle_id, "name": bundle.name, "version": bundle.version}
    finally:
        if not committed:
            work.discard()
