"""Small timing helpers shared by the sections."""

from __future__ import annotations

import time

import numpy as np


def rate(fn, items_per_call: int, min_seconds: float, min_calls: int = 3) -> float:
    """Items per second of ``fn`` over at least ``min_seconds`` and ``min_calls`` calls, after a warm-up."""
    return rate_and_cpu(fn, items_per_call, min_seconds, min_calls)[0]


def rate_and_cpu(fn, items_per_call: int, min_seconds: float, min_calls: int = 3) -> tuple[float, float]:
    """:func:`rate`, and the process's CPU milliseconds per item over the same calls (all threads)."""
    for _ in range(2):  # warm-up: oneDNN / ORT build their kernels for a new shape on the first calls
        fn()
    calls, started, cpu = 0, time.perf_counter(), time.process_time()
    while calls < min_calls or time.perf_counter() - started < min_seconds:
        fn()
        calls += 1
    items = calls * items_per_call
    return items / (time.perf_counter() - started), 1000 * (time.process_time() - cpu) / items


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "count": len(a)}
