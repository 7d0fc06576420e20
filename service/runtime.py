"""The serving process's thread pools: ONNX Runtime's intra-op pool does the heavy work, shared by the
encoder runs in flight; NumPy's BLAS stays on one thread (`index/blas_threads.py` says why)."""

from __future__ import annotations

import os


def encoder_threads(ort_threads: int, workers: int) -> int:
    """ORT intra-op threads per encoder run: as configured, else the process's cores shared by the ``workers``
    runs in flight (0 = ORT's default, all cores, for a single worker)."""
    if ort_threads or workers <= 1:
        return ort_threads
    return max(1, len(os.sched_getaffinity(0)) // workers)
