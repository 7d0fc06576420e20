"""A gallery's images a page at a time (``GET /v1/galleries/{g}/images``), for browsing it.

A page is cut from the ids of this process's index of the gallery (in memory: no scan of the store per page),
ordered by id, so pages stay stable while the gallery does not change whatever the index type. The records
come from the store; one deleted between the two reads is left out of its page.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from index.store import StoredImage

from .state import ServiceState


@dataclass
class ImagePage:
    total: int
    records: list[StoredImage]


def image_page(state: ServiceState, gallery: str, offset: int, limit: int) -> ImagePage:
    idx = state.index_for(gallery)
    ids = np.sort(idx.ids()) if idx is not None else np.zeros(0, np.int64)
    page = state.store.get_many(gallery, ids[offset:offset + limit].tolist())
    return ImagePage(len(ids), [r for r in page if r is not None])
