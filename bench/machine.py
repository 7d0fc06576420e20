"""The machine's description and its two limits, measured in the same run as everything else: float32
matmul rate (large sgemm) and memory bandwidth (large array copy and triad)."""

from __future__ import annotations

import os
import platform
import socket
import time

import numpy as np


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or no __version__
        return None


def describe() -> dict:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"host": socket.gethostname(), "cpu": _cpu_model(), "cores": cores, "memory_gb": _memory_gb(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "os": platform.platform(), "python": platform.python_version(),
            **{name: _version(name) for name in ("numpy", "torch", "onnxruntime", "onnx", "faiss")}}


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, thread pool start
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def matmul_rate(size: int = 2048, repeats: int = 5) -> dict:
    """GFLOP/s of a square float32 matmul (2*n^3 flops) in torch and numpy, all threads; the better of the
    two is the limit (both call an optimised sgemm; the better one is closer to the hardware)."""
    import torch

    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    b = a.T.copy()
    flops = 2.0 * size ** 3
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out = {"size": size,
           "numpy_gflops": flops / _best_seconds(lambda: a @ b, repeats) / 1e9,
           "torch_gflops": flops / _best_seconds(lambda: torch.mm(ta, tb), repeats) / 1e9}
    out["limit_gflops"] = max(out["numpy_gflops"], out["torch_gflops"])
    return out


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> dict:
    """GB/s moved by a copy (read + write) and a triad a = b + s*c (two reads + one write) over arrays far
    larger than the caches; the better of the two is the limit."""
    import torch

    n = megabytes * 2 ** 20 // 4
    b, c = torch.ones(n), torch.full((n,), 2.0)
    a = torch.empty(n)
    copy_s = _best_seconds(lambda: a.copy_(b), repeats)
    triad_s = _best_seconds(lambda: torch.add(b, c, alpha=3.0, out=a), repeats)
    out = {"array_mb": megabytes, "copy_gbs": 2 * n * 4 / copy_s / 1e9, "triad_gbs": 3 * n * 4 / triad_s / 1e9}
    out["limit_gbs"] = max(out["copy_gbs"], out["triad_gbs"])
    return out
