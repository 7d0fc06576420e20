"""The write path, independent of HTTP: decode -> embed -> store.put (durable) -> index.

The index is updated from what the store holds (:meth:`ServiceState.index_refresh`), after the store
write: a crash in between loses nothing, the change log brings it to the index at the next start.

Re-uploads (same bytes in the same gallery) are recognised by their content-hash id before
decoding and are never re-embedded. With ``keep_images`` the original bytes are kept too (to adapt a model to
the gallery, to re-embed it with another model, for thumbnails): in the same store write, on disk in the blob
store by default (fsynced before the Redis transaction that references them; index/store.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from index.store import image_id

from .batcher import embed_images
from .images import ImageError, decode_image
from .state import ServiceState


@dataclass
class IngestResult:
    items: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: seconds per stage (decode, embed, store) for the reid_stage_seconds metric
    seconds: dict[str, float] = field(default_factory=dict)


def ingest(state: ServiceState, gallery: str, files: list[tuple[str | None, bytes]],
           metas: list[dict[str, str]]) -> IngestResult:
    """Ingest ``files`` ((filename, bytes) pairs) into ``gallery``. Blocking; run in a thread."""
    with state.model_lock.shared():  # one model from embedding to index add
        return _ingest(state, gallery, files, metas)


def _ingest(state: ServiceState, gallery: str, files: list[tuple[str | None, bytes]],
            metas: list[dict[str, str]]) -> IngestResult:
    store = state.store
    res = IngestResult()
    ids = [image_id(gallery, data) for _, data in files]

    already = store.exists_many(gallery, ids)

    slots: list[tuple[int, int]] = []  # (file index, id) accepted in this request, in order
    new: list[tuple[int, int, Any]] = []  # (file index, id, image) to embed
    seen: set[int] = set()
    status: dict[int, str] = {}
    t0 = time.perf_counter()
    for n, ((fname, data), id_, existed) in enumerate(zip(files, ids, already)):
        if existed or id_ in seen:
            slots.append((n, id_))
            status[n] = "exists"
            continue
        try:
            img = decode_image(data, max_pixels=state.settings.max_image_pixels)
        except ImageError as e:
            res.errors.append({"index": n, "filename": fname, "code": e.code, "message": e.message})
            continue
        seen.add(id_)
        slots.append((n, id_))
        new.append((n, id_, img))

    res.seconds["decode"] = time.perf_counter() - t0
    if new:
        t0 = time.perf_counter()
        vecs = embed_images(state, [img for _, _, img in new])  # micro-batched with other requests
        res.seconds["embed"] = time.perf_counter() - t0
        records = [(id_, vec, {**metas[n], "filename": files[n][0]}) for (n, id_, _), vec in zip(new, vecs)]
        blobs = [files[n][1] for n, _, _ in new] if state.settings.keep_images else None
        t0 = time.perf_counter()
        existed = store.put_many(gallery, records, model=state.bundle.model_id, images=blobs)  # durable first
        res.seconds["store"] = time.perf_counter() - t0
        for (n, _, _), ex in zip(new, existed):
            status[n] = "exists" if ex else "created"
        state.index_refresh(gallery, [i for _, i, _ in new])

    if slots:
        # Existing images: make sure the index has them too (reconciles a crash between
        # store write and index add), and report their stored external_id.
        idx = state.index_for(gallery, create=True)
        missing = [i for n, i in slots if status[n] == "exists" and not idx.contains(i)]
        if missing:
            state.index_refresh(gallery, missing)
        # an existing image reports the external_id it was stored with; a new one, the one just written
        old = [(n, i) for n, i in slots if status[n] == "exists"]
        stored = {n: rec for (n, _), rec in zip(old, store.get_many(gallery, [i for _, i in old]))}
        for n, id_ in slots:
            rec = stored.get(n)
            ext = rec.metadata.get("external_id") if rec is not None else metas[n].get("external_id")
            res.items.append({"index": n, "id": id_, "external_id": ext, "status": status[n]})
    res.errors.sort(key=lambda e: e["index"])
    return res
