"""Sizes of each section: the full run (`make bench`, under 20 minutes on the 2-core VM) and `--quick`
(tiny sizes, under 3 minutes: it exists so the benchmark code cannot rot)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .encoder import default_threads


@dataclass(frozen=True)
class BenchConfig:
    quick: bool = False
    seconds: float = 2.0  # per throughput figure
    matmul_size: int = 3072
    bandwidth_mb: int = 512
    batches: tuple = (1, 8, 32, 64)
    threads: tuple = field(default_factory=lambda: tuple(default_threads()))
    profile_runs: int = 20
    resnet_input: tuple = (256, 128)  # the usual ReID input for ResNet-50
    resnet_batches: tuple = (1, 8, 32)
    calibration_images: int = 256
    protocols: tuple = ("prid450s", "prid2011", "cuhk03")
    refine_modes: tuple = ("none", "joint", "local", "kreciprocal", "local_kreciprocal")
    candidates: tuple = (50, 100, 200, 500)
    kreciprocal_candidates: tuple = (200, 0)
    ingest_clients: int = 4
    ingest_requests: int = 6
    ingest_batch: int = 32
    ingest_workers: tuple = (1, 2)  # REID_EMBED_WORKERS of the servers measured
    server_threads: int = 0
    search_sizes: tuple = (10_000, 100_000, 1_000_000)
    search_queries: int = 200
    hnsw_max: int = 100_000
    http_size: int = 1_000_000
    http_requests: int = 200
    http_index_type: str = "ivf_flat"
    local_k: tuple = (50, 100, 200, 500)
    refine_gallery: int = 10_000
    refine_queries: int = 20
    joint_sizes: tuple = (1_000, 5_000, 20_000)
    dense_sizes: tuple = (1_000, 2_000, 4_000, 8_000)  # beyond: extrapolated (20,000 would take ~60 s, 8 GB)
    refine_threads: int = field(default_factory=lambda: max(default_threads()))
    restart_n: int = 50_000
    scale_n: int = 10_000_000  # bench/scale.py: its saved result is reported unless scale_fresh
    scale_fresh: bool = False
    scale_queries: int = 500  # tuning queries, and as many measured ones
    scale_sweep_m: tuple = (16, 32, 64)  # PQ code bytes tried at the reduced size

    @property
    def local_goal_k(self) -> int:
        return 200 if 200 in self.local_k else max(self.local_k)


FULL = BenchConfig()
QUICK = replace(FULL, quick=True, seconds=0.3, matmul_size=1024, bandwidth_mb=64, batches=(1, 8), threads=(1,),
                profile_runs=3, resnet_input=(128, 64), resnet_batches=(1, 4), calibration_images=16,
                protocols=("prid450s",), candidates=(50,), kreciprocal_candidates=(50,), ingest_requests=1,
                ingest_batch=8, search_sizes=(2_000,), search_queries=20, hnsw_max=2_000, http_size=2_000,
                http_requests=10, local_k=(50,), refine_gallery=1_000, refine_queries=3, joint_sizes=(500,),
                dense_sizes=(200, 400), restart_n=500, scale_n=50_000,
                scale_queries=100, scale_sweep_m=(32,))
