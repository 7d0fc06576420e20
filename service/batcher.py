"""Micro-batching: images from concurrent requests are embedded in one encoder run.

A request's images, preprocessed in its own thread, go to a queue; a worker thread takes what is
queued, waits up to ``max_delay_ms`` for more (until ``max_size`` images), runs the encoder once and hands
each request its rows; ``workers`` such threads run at once (``Settings.embed_workers``). Requests are
batched only with others for the same embedder (a model switch never mixes models in one run).
``observe(n)`` receives each run's image count (the ``reid_embed_batch_size`` histogram).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Sequence

import numpy as np

from .embedder import l2_normalize, mirror


class MicroBatcher:
    def __init__(self, max_size: int, max_delay_ms: float, observe: Callable[[int], None] | None = None,
                 workers: int = 1):
        self.max_size = max(1, int(max_size))
        self.max_delay = max(0.0, float(max_delay_ms)) / 1000.0
        self.observe = observe
        self._q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name=f"embed-batcher-{i}", daemon=True)
                         for i in range(max(1, int(workers)))]
        for t in self._threads:
            t.start()

    def embed(self, embedder, images: Sequence) -> np.ndarray:
        """Embed ``images`` with ``embedder`` (blocking), batched with other callers' images. Preprocessing
        runs here, in the caller's thread, so it overlaps the encoder run of the batch before: the batching
        thread only ever runs the encoder."""
        images = list(images)
        if not images:
            return np.zeros((0, embedder.dim), np.float32)
        fut: Future = Future()
        self._q.put((embedder, embedder.preprocess(images), fut))
        return fut.result()

    def stop(self) -> None:
        self._stop.set()
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(timeout=10)

    def _loop(self) -> None:
        carry = None
        while not self._stop.is_set():
            first = carry or self._q.get()
            carry = None
            if first is None:
                continue
            batch, n = [first], len(first[1])
            deadline = time.monotonic() + self.max_delay
            while n < self.max_size:
                left = deadline - time.monotonic()
                try:
                    item = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    break
                if item[0] is not first[0] or n + len(item[1]) > self.max_size:
                    carry = item  # another model, or too big to fit: it starts the next batch
                    break
                batch.append(item)
                n += len(item[1])
            self._run(first[0], batch, n)

    def _run(self, embedder, batch: list, n: int) -> None:
        try:
            arrays = [a for _, a, _ in batch]
            vecs = embedder.embed_arrays(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
        except BaseException as e:  # every waiting request learns of the failure
            for _, _, fut in batch:
                fut.set_exception(e)
            return
        if self.observe is not None:
            self.observe(n)
        start = 0
        for _, images, fut in batch:
            fut.set_result(vecs[start:start + len(images)])
            start += len(images)


def embed_images(state, images: Sequence) -> np.ndarray:
    """The service's embedding call: through the app's micro-batcher when there is one."""
    batcher = getattr(state, "batcher", None)
    if batcher is None:
        return state.embedder.embed(images)
    return batcher.embed(state.embedder, images)


def embed_queries(state, images: Sequence) -> np.ndarray:
    """Query images as the bundle's card says: with `query_flip`, each image and its mirror image in one
    encoder run, their embeddings averaged and L2-normalised; else as gallery images are."""
    images = list(images)
    if not state.embedder.query_flip or not images:
        return embed_images(state, images)
    both = embed_images(state, images + [mirror(im) for im in images])
    return l2_normalize(both[:len(images)] + both[len(images):])
