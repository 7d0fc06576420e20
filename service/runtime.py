"""The serving process's thread pools: ONNX Runtime's intra-op pool does the heavy work; NumPy's BLAS only
multiplies small matrices here (queries x candidates, the k-NN graph of a few hundred features), and its
idle threads spin-waiting beside ORT's on a 2-core machine made `local` refinement at K = 200 2.5x slower
(35-40 ms against 14.7 ms with one BLAS thread, measured with models/bench)."""

from __future__ import annotations

import os

from threadpoolctl import threadpool_limits

SERVING_BLAS_THREADS = 1


def limit_blas_threads() -> threadpool_limits:
    """Limit BLAS to ``SERVING_BLAS_THREADS`` now (for the process); usable as a context manager to restore."""
    return threadpool_limits(SERVING_BLAS_THREADS, user_api="blas")


def encoder_threads(ort_threads: int, workers: int) -> int:
    """ORT intra-op threads per encoder run: as configured, else the process's cores shared by the ``workers``
    runs in flight (0 = ORT's default, all cores, for a single worker)."""
    if ort_threads or workers <= 1:
        return ort_threads
    return max(1, len(os.sched_getaffinity(0)) // workers)
