"""What refinement buys and costs, measured with the serving code (`index.refine` over the bundle's
`nformer.onnx`): accuracy of every mode on a protocol, per-query latency at growing gallery sizes, and the
memory/time of joint refinement at large N, sparse path vs the official dense formulation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from index.blas_threads import limit_blas_threads
from index.bundle import NFormerSpec, load_bundle, nformer_file
from index.metrics import RetrievalMetrics, evaluate_rankings
from index.refine import NeighborTransformer, Refiner, topk_neighbors

from .data.datasets import ReIDDataset

DEFAULT_CANDIDATES = (50, 100, 200, 500)


def bundle_refiner(bundle_dir: str | Path, threads: int = 0, precision: str = "int8", **kwargs) -> Refiner:
    bundle = load_bundle(bundle_dir)
    name, nformer = nformer_file(bundle.card["files"], precision), None
    if name is not None:
        nformer = NeighborTransformer(bundle.path / name, NFormerSpec.from_card(bundle.card["nformer"]), threads)
    return Refiner(nformer, **kwargs)


def mode_label(mode: str, candidates: int | None) -> str:
    return f"{mode}@{candidates}" if candidates else mode


#: the modes that refine each query's K candidates (index/refine.py), measured at every K of `candidates`
PER_CANDIDATE_MODES = ("local", "local_kreciprocal")


def evaluate_modes(refiner: Refiner, dataset: ReIDDataset, query: np.ndarray, gallery: np.ndarray,
                   modes=("none", "joint", "local", "kreciprocal", "local_kreciprocal"),
                   candidates=DEFAULT_CANDIDATES, kreciprocal_candidates=(200, 0)) -> dict[str, RetrievalMetrics]:
    """Every mode on one protocol; `local` and `local_kreciprocal` at each K of `candidates`, `kreciprocal`
    at each K of `kreciprocal_candidates` (0 = the classic: all queries and the whole gallery together)."""
    ids = ([s.pid for s in dataset.query], [s.pid for s in dataset.gallery], [s.camid for s in dataset.query],
           [s.camid for s in dataset.gallery])
    runs = []
    for mode in modes:
        ks = (candidates if mode in PER_CANDIDATE_MODES else kreciprocal_candidates if mode == "kreciprocal"
              else (None,))
        runs += [(mode, k) for k in ks]
    results = {}
    for mode, k in tqdm(runs, desc=f"{dataset.name} refine modes", leave=False):
        scores = refiner.with_candidates(k or 0).similarities(mode, query, gallery)
        results[mode_label(mode, k)] = evaluate_rankings(-scores, *ids)
    return results


def results_markdown(results: dict[str, dict[str, RetrievalMetrics]]) -> str:
    """One table per protocol: rank-1 and mAP per mode (percent)."""
    lines = []
    for name, by_mode in results.items():
        lines += [f"**{name}**", "", "| mode | rank-1 | rank-5 | mAP |", "|---|---|---|---|"]
        for label, m in by_mode.items():
            lines.append(f"| {label} | {100 * m.ranks['rank1']:.1f} | {100 * m.ranks['rank5']:.1f} | "
                         f"{100 * m.mAP:.1f} |")
        lines.append("")
    return "\n".join(lines)


def sample_gallery(real: np.ndarray, size: int, seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """`size` features drawn from real ones, each jittered so copies are not exact duplicates."""
    rng = np.random.default_rng(seed)
    out = real[rng.integers(len(real), size=size)] + noise * rng.standard_normal((size, real.shape[1])) / np.sqrt(real.shape[1])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def joint_neighbors(query: np.ndarray, gallery: np.ndarray, gallery_top: tuple[np.ndarray, np.ndarray], k: int):
    """Exact top-k over [queries; gallery] from a cached gallery k-NN graph (indices, similarities): a
    gallery row's new neighbours are among its cached ones and the queries, so one pass over the gallery
    per query batch suffices (no N^2 work at request time)."""
    q, g = len(query), len(gallery)
    top_idx, top_sim = gallery_top
    q_rows = topk_neighbors(query, k, base=np.concatenate([query, gallery]))
    q_to_g = gallery @ query.T  # [G,Q]
    cand_idx = np.concatenate([top_idx + q, np.broadcast_to(np.arange(q), (g, q))], axis=1)
    cand_sim = np.concatenate([top_sim, q_to_g], axis=1)
    order = np.argsort(-cand_sim, axis=1, kind="stable")[:, :k]
    return np.concatenate([q_rows, np.take_along_axis(cand_idx, order, axis=1)])


def gallery_graph(gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each gallery entry's k nearest gallery entries and their similarities (built once per gallery)."""
    return topk_neighbors(gallery, k, with_similarities=True)


def refinement_latency(refiner: Refiner, real: np.ndarray, sizes=(1_000, 10_000, 100_000), queries: int = 20,
                       candidates=DEFAULT_CANDIDATES, joint_queries: int = 1) -> dict:
    """Per-query milliseconds (p50) of each mode at each gallery size: exact FAISS search for the candidates
    plus the refinement. `joint` uses a cached gallery k-NN graph (built once per gallery, reported apart).
    Timed with the serving process's thread pools (BLAS on one thread: its spinning pool beside ONNX Runtime's
    made `local` three times slower)."""
    with limit_blas_threads():
        return _refinement_latency(refiner, real, sizes, queries, candidates, joint_queries)


def _refinement_latency(refiner: Refiner, real: np.ndarray, sizes, queries: int, candidates,
                        joint_queries: int) -> dict:
    import faiss

    out: dict = {}
    for size in tqdm(sizes, desc="refinement latency", unit="gallery"):
        gallery = sample_gallery(real, size)
        flat = faiss.IndexFlatIP(gallery.shape[1])
        flat.add(gallery)
        probes = sample_gallery(real, queries, seed=2 + size)
        row: dict = {}

        def timed(fn) -> float:
            times = []
            for q in probes:
                started = time.perf_counter()
                fn(q[None])
                times.append((time.perf_counter() - started) * 1000)
            return float(np.median(times))

        def on_candidates(mode: str, k: int):  # what serves: FAISS's top K, then the mode re-ranks them
            def run(q):
                _, ids = flat.search(q, k)
                refiner.rerank(mode, q, gallery[ids[0]])
            return run

        row["none"] = timed(lambda q: flat.search(q, 10))
        row.update({f"local@{k}": timed(on_candidates("local", k)) for k in candidates})
        row["kreciprocal@200"] = timed(on_candidates("kreciprocal", 200))
        row.update({f"local_kreciprocal@{k}": timed(on_candidates("local_kreciprocal", k)) for k in candidates})
        if refiner.nformer is not None:
            k = refiner.nformer.spec.topk
            started = time.perf_counter()
            graph = gallery_graph(gallery, k)
            row["joint_graph_build_s"] = round(time.perf_counter() - started, 2)
            times = []
            for q in probes[:joint_queries]:
                started = time.perf_counter()
                feats = np.concatenate([q[None], gallery])
                refiner.nformer(feats, neighbors=joint_neighbors(q[None], gallery, graph, k))
                times.append((time.perf_counter() - started) * 1000)
            row["joint"] = float(np.median(times))
        out[size] = {key: round(v, 2) for key, v in row.items()}
        flat.reset()  # free its vectors before the next, larger gallery
    return out


JOINT_COST_SCRIPT = """
import json, sys, time
import numpy as np
path, n, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
x = rng.standard_normal((n, dim)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
def high_water_mb():  # VmHWM: this process's peak RSS (ru_maxrss would carry the forking parent's peak over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
before = high_water_mb()
started = time.perf_counter()
if path == "dense":
    import torch
    from models.nformer import NFormer, NFormerConfig
    torch.set_num_threads(int(sys.argv[4]))
    with torch.no_grad():
        NFormer(NFormerConfig(dim=dim)).eval()(torch.from_numpy(x)[None], dense=True)
else:
    from index.bundle import NFormerSpec
    from index.refine import NeighborTransformer
    spec = NFormerSpec(**json.loads(sys.argv[5]))
    NeighborTransformer(sys.argv[6], spec, threads=int(sys.argv[4]))(x)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_rss_mb": high_water_mb(), "baseline_rss_mb": before}))
"""


def joint_cost(bundle_dir: str | Path, n: int = 20_000, threads: int = 2, paths=("sparse", "dense"),
               precision: str = "int8") -> dict:
    """Time and peak memory of one joint refinement of N features, each path in a fresh process so the
    peaks do not mix: `sparse` = the bundle's NFormer graph at `precision` on ONNX Runtime (what serves), `dense` = the
    official formulation (N x N logits and mask) in torch, same width and depth."""
    bundle = load_bundle(bundle_dir)
    spec = NFormerSpec.from_card(bundle.card["nformer"])
    graph = bundle.path / nformer_file(bundle.card["files"], precision)
    root = Path(__file__).resolve().parents[1]
    out = {}
    for path in paths:
        proc = subprocess.run([sys.executable, "-c", JOINT_COST_SCRIPT, path, str(n), str(spec.dim), str(threads),
                               json.dumps(spec.__dict__), str(graph)],
                              cwd=root, capture_output=True, text=True)
        if proc.returncode:
            out[path] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else f"exit {proc.returncode}"}
        else:
            out[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out



def latency_markdown(latency: dict) -> str:
    sizes = list(latency)
    modes = [m for m in latency[sizes[0]] if not m.endswith("_s")]
    lines = ["| mode | " + " | ".join(f"{int(n):,} gallery" for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for mode in modes:
        lines.append(f"| {mode} | " + " | ".join(f"{latency[n].get(mode, float('nan')):.1f} ms" for n in sizes) + " |")
    return "\n".join(lines) + "\n"
