"""`make bench`: encoder throughput (ONNX Runtime vs torch eager, the way torchreid/fast-reid extract
features) on the same bundle and input size, and exact-search latency at several gallery sizes.
Figures are measured side by side in one run; absolute times on a shared machine are noisy."""

from __future__ import annotations

import datetime as dt
import json
import platform
import socket
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from index.vector_index import VectorIndex

from .reid_model import NormalizedEncoder, ReIDModel


def _rate(fn, images_per_call: int, min_seconds: float) -> float:
    fn()  # warm-up
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        fn()
        calls += 1
    return calls * images_per_call / (time.perf_counter() - started)


def encoder_throughput(bundle_dir: Path, batch_sizes=(1, 8, 32), seconds: float = 3.0) -> dict:
    card = json.loads((bundle_dir / "model.json").read_text())
    h, w = card["input"]["height"], card["input"]["width"]
    session = ort.InferenceSession(str(bundle_dir / "encoder.onnx"), providers=["CPUExecutionProvider"])
    results = {"onnxruntime": {}, "torch_eager": {}}
    model = NormalizedEncoder(ReIDModel(card["backbone"], 1, last_stride=card["recipe"]["last_stride"],
                                        embedding_dim=card["recipe"].get("embedding_dim", 0))).eval()
    for batch in batch_sizes:
        x = np.random.default_rng(0).standard_normal((batch, 3, h, w)).astype(np.float32)
        results["onnxruntime"][batch] = _rate(lambda: session.run(["features"], {"images": x}), batch, seconds)
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            results["torch_eager"][batch] = _rate(lambda: model(xt), batch, seconds)
    best = max(batch_sizes)
    results["speedup_at_batch_%d" % best] = results["onnxruntime"][best] / results["torch_eager"][best]
    return results


def search_latency(dim: int, sizes=(10_000, 100_000), queries: int = 200, k: int = 10) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for n in sizes:
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index = VectorIndex(dim)
        index.add(np.arange(n, dtype=np.int64), vectors)
        timings = []
        for q in vectors[rng.integers(0, n, queries)]:
            started = time.perf_counter()
            index.search(q[None], k)
            timings.append((time.perf_counter() - started) * 1000)
        out[n] = {"p50_ms": float(np.percentile(timings, 50)), "p99_ms": float(np.percentile(timings, 99))}
    return out


def run_bench(bundle_dir: str | Path, out_dir: str | Path = "bench/results", quick: bool = False) -> str:
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    card = json.loads((bundle_dir / "model.json").read_text())
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seconds = 1.0 if quick else 3.0
    encoder = encoder_throughput(bundle_dir, seconds=seconds)
    search = search_latency(card["embedding_dim"], sizes=(10_000,) if quick else (10_000, 100_000))
    machine = {"host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
               "cores": torch.get_num_threads(), "python": platform.python_version(),
               "onnxruntime": ort.__version__, "torch": torch.__version__}
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "bundle": f"{card['name']}:{card['version']}", "input": card["input"],
              "encoder_images_per_second": encoder, "search_exact_latency": search}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{dt.date.today().isoformat()}-{machine['host']}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Benchmark {report['date']} on {machine['host']} ({machine['cores']} threads)", "",
             f"Bundle `{report['bundle']}`, input {card['input']['height']}x{card['input']['width']}.", "",
             "| batch | ONNX Runtime img/s | torch eager img/s | ratio |", "|---|---|---|---|"]
    for batch, rate in encoder["onnxruntime"].items():
        eager = encoder["torch_eager"][batch]
        lines.append(f"| {batch} | {rate:.1f} | {eager:.1f} | {rate / eager:.2f}x |")
    lines += ["", "| gallery size | exact search p50 ms | p99 ms |", "|---|---|---|"]
    lines += [f"| {n:,} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} |" for n, v in search.items()]
    markdown = "\n".join(lines) + "\n"
    (out_dir / f"{stem}.md").write_text(markdown)
    return markdown
