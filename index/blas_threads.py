"""NumPy's BLAS on one thread wherever refinement runs beside ONNX Runtime (the serving process, and
`reid evaluate` and the benchmark when they time refinement as served). BLAS only multiplies small matrices
here (queries x candidates, the k-NN graph of a few hundred features), and its idle threads spin-waiting
beside ORT's on a 2-core machine made `local` refinement at K = 200 2.5x slower (35-40 ms against 14.7 ms
with one BLAS thread, measured with the benchmark)."""

from __future__ import annotations

from threadpoolctl import threadpool_limits

SERVING_BLAS_THREADS = 1


def limit_blas_threads() -> threadpool_limits:
    """Limit BLAS to ``SERVING_BLAS_THREADS`` now (for the process); usable as a context manager to restore."""
    return threadpool_limits(SERVING_BLAS_THREADS, user_api="blas")
