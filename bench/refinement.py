"""Refinement cost against k-reciprocal re-ranking done the peers' way. `local` at K candidates per query
(serving path: FAISS candidates, then nformer.onnx) beside k-reciprocal on the same K candidates, in the
reid-strong-baseline layout and in the project's scalable form; `joint` over N features (time and peak memory in a
fresh process, `models.refine_eval.joint_cost`) beside the full (Q+G)^2 k-reciprocal at the same N, measured
where it fits and extrapolated (a*N + b*N^2) beyond."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from index.bundle import ENCODER_FILE, NFORMER_FILE
from index.recall import clustered_vectors
from index.rerank import k_reciprocal_rerank, k_reciprocal_rerank_dense
from models.refine_eval import bundle_refiner, joint_cost, refinement_latency, sample_gallery

from . import data
from .features import protocol_features

ROOT = Path(__file__).resolve().parents[1]

KRECIPROCAL_COST_SCRIPT = """
import json, sys, time
import numpy as np
from index.rerank import k_reciprocal_rerank, k_reciprocal_rerank_dense
layout, n, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
x = rng.standard_normal((n, dim)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
def high_water_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
before = high_water_mb()
started = time.perf_counter()
(k_reciprocal_rerank_dense if layout == "dense" else k_reciprocal_rerank)(x[:1], x[1:])
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": high_water_mb(),
                  "baseline_rss_mb": before}))
"""


def kreciprocal_cost(n: int, dim: int, layout: str) -> dict:
    """One query against N-1 gallery features (N = Q+G, what joint refines), in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", KRECIPROCAL_COST_SCRIPT, layout, str(n), str(dim)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _per_query_ms(fn, probes: np.ndarray, candidates: list[np.ndarray]) -> float:
    times = []
    for q, c in zip(probes, candidates):
        started = time.perf_counter()
        fn(q[None], c)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def restricted_kreciprocal(real: np.ndarray, ks, queries: int) -> dict:
    """Per-query ms of k-reciprocal on each query's top-K candidates: reid-strong-baseline layout vs scalable."""
    gallery, probes = sample_gallery(real, 10_000), sample_gallery(real, queries, seed=3)
    order = np.argsort(-(probes @ gallery.T), axis=1)
    out = {}
    for k in ks:
        cands = [gallery[row[:k]] for row in order]
        out[k] = {"dense_ms": _per_query_ms(k_reciprocal_rerank_dense, probes, cands),
                  "scalable_ms": _per_query_ms(k_reciprocal_rerank, probes, cands)}
    return out


def extrapolate(measured: dict, n: int) -> dict | None:
    """Time and memory at ``n`` from the measured Ns: time fitted as a*N + b*N^2 (the per-row Python loops
    and the (Q+G)^2 matrices), extra memory as c*N^2, both least squares with non-negative terms."""
    ok = sorted((m, v) for m, v in measured.items() if "seconds" in v)
    if not ok:
        return None
    ns = np.array([m for m, _ in ok], dtype=np.float64)
    secs = np.array([v["seconds"] for _, v in ok])
    extra = np.array([v["peak_rss_mb"] - v["baseline_rss_mb"] for _, v in ok])
    if len(ok) >= 2:
        (a, b), *_ = np.linalg.lstsq(np.stack([ns, ns ** 2], 1), secs, rcond=None)
        a, b = max(a, 0.0), max(b, 0.0)
    else:
        a, b = 0.0, secs[0] / ns[0] ** 2
    c = float(np.sum(extra * ns ** 2) / np.sum(ns ** 4))
    return {"from_n": [int(m) for m in ns], "seconds": a * n + b * n * n,
            "peak_rss_mb": float(np.mean([v["baseline_rss_mb"] for _, v in ok])) + max(c, 0.0) * n * n}


def nformer_profile(nformer, real: np.ndarray, k: int, runs: int, threads: int) -> dict:
    """ORT's operator profile of the serving NFormer on one query and its top-``k`` candidates."""
    from index.refine import sample_landmarks, topk_neighbors

    from .encoder import op_profile

    gallery, query = sample_gallery(real, 10_000), sample_gallery(real, 1, seed=7)
    x = np.concatenate([query, gallery[np.argsort(-(gallery @ query[0]))[:k]]]).astype(np.float32)
    spec = nformer.spec
    feeds = {"features": x, "neighbors": topk_neighbors(x, spec.topk),
             "landmarks": sample_landmarks(len(x), spec.layers, spec.landmarks, spec.landmark_seed)}
    return {"tokens": len(x), **op_profile(nformer.path, feeds, runs, threads=threads)}


def run(bundle_dir: Path, cfg) -> dict:
    """``cfg``: local_k, refine_gallery, refine_queries, joint_sizes, dense_sizes, refine_threads."""
    card = data.card(bundle_dir)
    dataset = data.protocol(data.PROTOCOL)
    if dataset is not None:
        real = np.concatenate(protocol_features(bundle_dir / ENCODER_FILE, card, dataset))
    else:
        real = clustered_vectors(500, card["embedding_dim"])
    refiner = bundle_refiner(bundle_dir, threads=cfg.refine_threads)  # what serves: int8 when shipped
    out = {"features": "real" if dataset is not None else "clustered random", "gallery": cfg.refine_gallery,
           "nformer": refiner.nformer.path.name if refiner.nformer is not None else None,
           "latency_ms": refinement_latency(refiner, real, sizes=(cfg.refine_gallery,),
                                            queries=cfg.refine_queries, candidates=cfg.local_k)[cfg.refine_gallery],
           "restricted_kreciprocal_ms": restricted_kreciprocal(real, cfg.local_k, cfg.refine_queries)}
    if refiner.nformer is None:
        out["joint"] = {"skipped": "bundle has no nformer.onnx"}
    else:
        out["nformer_profile"] = nformer_profile(refiner.nformer, real, cfg.local_goal_k, cfg.profile_runs,
                                                 cfg.refine_threads)
        out["joint"] = {n: joint_cost(bundle_dir, n, cfg.refine_threads, paths=("sparse",))["sparse"]
                        for n in cfg.joint_sizes}
        if refiner.nformer.path.name != NFORMER_FILE:  # the fp32 graph beside it, same queries and N
            fp32 = bundle_refiner(bundle_dir, threads=cfg.refine_threads, precision="fp32")
            local = refinement_latency(fp32, real, sizes=(cfg.refine_gallery,), queries=cfg.refine_queries,
                                       candidates=cfg.local_k)[cfg.refine_gallery]
            out["fp32"] = {"latency_ms": {k: v for k, v in local.items() if k.startswith("local@")},
                           "joint": {n: joint_cost(bundle_dir, n, cfg.refine_threads, paths=("sparse",),
                                                   precision="fp32")["sparse"] for n in cfg.joint_sizes}}
    dim = card["embedding_dim"]
    out["kreciprocal_full"] = {n: kreciprocal_cost(n, dim, "scalable") for n in cfg.joint_sizes}
    dense = {n: kreciprocal_cost(n, dim, "dense") for n in cfg.dense_sizes}
    out["kreciprocal_dense"] = dense
    top = max(cfg.joint_sizes)
    out["kreciprocal_dense_at_max_n"] = dense[top] if top in dense else {**(extrapolate(dense, top) or {}),
                                                                          "extrapolated": True}
    out["max_n"] = top
    return out
