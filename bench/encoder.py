"""Encoder throughput: ONNX Runtime against torch eager (how torchreid / fast-reid extract features) on the
same bundle and the same real images, and against the machine's limits (FLOP/s / matmul rate, bytes/s /
bandwidth). Then the knobs: graph optimisation level, intra-op threads, batch size; an ORT profile; and a
random-weight ResNet-50 bundle for the dense-convolution goal (only its speed matters)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from index.bundle import ENCODER_FILE, WEIGHTS_FILE, InputSpec

from . import data
from .roofline import bytes_at_batch, encoder_cost
from .timing import rate

LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def session(onnx_path: str | Path, level: str = "all", threads: int = 0,
            profile_prefix: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def ort_rate(sess: ort.InferenceSession, x: np.ndarray, batch: int, seconds: float) -> float:
    xb = np.ascontiguousarray(x[:batch])
    name = sess.get_inputs()[0].name
    return rate(lambda: sess.run(None, {name: xb}), batch, seconds)


def interleaved_rates(sessions: dict, x: np.ndarray, batch: int, seconds: float, rounds: int = 5) -> dict:
    """img/s of each session, measured in alternating slices and given as medians: a neighbour's load on a
    shared machine then hits every session alike instead of skewing their ratio."""
    rates: dict = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, sess in sessions.items():
            rates[k].append(ort_rate(sess, x, batch, seconds / rounds))
    return {k: float(np.median(v)) for k, v in rates.items()}


def eager_model(bundle_dir: Path):
    """The bundle's encoder in torch eager mode, from its float16 `weights.pt` (cast back to float32)."""
    from models.reid_model import NormalizedEncoder
    from models.train import load_trained_model

    model, _, _ = load_trained_model(bundle_dir / WEIGHTS_FILE)
    return NormalizedEncoder(model.float()).eval()


def eager_rate(model, x: np.ndarray, batch: int, seconds: float) -> float:
    import torch

    xb = torch.from_numpy(np.ascontiguousarray(x[:batch]))
    with torch.inference_mode():
        return rate(lambda: model(xb), batch, seconds)


def against_limits(cost: dict, images_per_s: float, batch: int, limits: dict) -> dict:
    flops_s = cost["flops"] * images_per_s
    bytes_s = bytes_at_batch(cost, batch) * images_per_s
    return {"gflops_per_s": flops_s / 1e9, "gbytes_per_s": bytes_s / 1e9,
            "matmul_fraction": flops_s / 1e9 / limits["limit_gflops"],
            "bandwidth_fraction": bytes_s / 1e9 / limits["limit_gbs"]}


def profile_summary(onnx_path: Path, x: np.ndarray, batch: int, runs: int, top: int = 8) -> dict:
    """The encoder's top operator types at ``batch`` (see :func:`op_profile`)."""
    return {"batch": batch, **op_profile(onnx_path, np.ascontiguousarray(x[:batch]), runs, top)}


def op_profile(onnx_path: Path, feeds: dict | np.ndarray, runs: int, top: int = 8, threads: int = 0) -> dict:
    """Top operator types by time from ORT's own profiler (`enable_profiling`), share of the node time.
    ``feeds``: the inputs by name, or one array for a single-input graph."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(onnx_path, threads=threads, profile_prefix=str(Path(tmp) / "profile"))
        if not isinstance(feeds, dict):
            feeds = {sess.get_inputs()[0].name: feeds}
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
    total = sum(by_op.values()) or 1.0
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {"runs": runs, "top_ops": [{"op": op, "ms_per_run": us / 1000 / runs, "share": us / total}
                                      for op, us in ranked]}


def build_resnet50(out_dir: Path, height: int, width: int) -> Path:
    """A ReID ResNet-50 (last stride 1, 2048-d) with random weights, exported as the bundles are."""
    import torch

    from models.export import export_onnx
    from models.reid_model import NormalizedEncoder, ReIDModel

    torch.manual_seed(0)
    model = NormalizedEncoder(ReIDModel("resnet50", 1, pretrained=False, last_stride=1)).eval()
    path = out_dir / "resnet50.onnx"
    export_onnx(model, InputSpec(height, width), path)
    return path


def run(bundle_dir: Path, limits: dict, cfg) -> dict:
    """``cfg``: batches, seconds, threads (list), resnet_input (h, w), resnet_batches, profile_runs."""
    card = data.card(bundle_dir)
    x, source = data.images(card, max(cfg.batches))
    onnx_path = bundle_dir / ENCODER_FILE
    cost = encoder_cost(onnx_path)
    sess = session(onnx_path)
    eager = eager_model(bundle_dir) if (bundle_dir / WEIGHTS_FILE).exists() else None
    by_batch = {}
    for b in cfg.batches:
        row = {"onnxruntime": ort_rate(sess, x, b, cfg.seconds)}
        if eager is not None:
            row["torch_eager"] = eager_rate(eager, x, b, cfg.seconds)
            row["ratio"] = row["onnxruntime"] / row["torch_eager"]
        row.update(against_limits(cost, row["onnxruntime"], b, limits))
        by_batch[b] = row
    best = max(by_batch, key=lambda b: by_batch[b]["onnxruntime"])
    levels = {lv: ort_rate(session(onnx_path, lv), x, best, cfg.seconds) for lv in LEVELS}
    threads = {t: ort_rate(session(onnx_path, threads=t), x, best, cfg.seconds) for t in cfg.threads}
    out = {"bundle": f"{card['name']}:{card['version']}", "backbone": card["backbone"], "input": card["input"],
           "images": source, "cost": cost, "by_batch": by_batch, "best_batch": best,
           "optimization_levels": levels, "intra_op_threads": threads,
           "profile": profile_summary(onnx_path, x, best, cfg.profile_runs),
           "resnet50": resnet50(limits, cfg)}
    return out


def resnet50(limits: dict, cfg) -> dict:
    h, w = cfg.resnet_input
    with tempfile.TemporaryDirectory() as tmp:
        path = build_resnet50(Path(tmp), h, w)
        cost = encoder_cost(path)
        sess = session(path)
        x = np.random.default_rng(0).standard_normal((max(cfg.resnet_batches), 3, h, w)).astype(np.float32)
        by_batch = {}
        for b in cfg.resnet_batches:
            r = ort_rate(sess, x, b, cfg.seconds)
            by_batch[b] = {"onnxruntime": r, **against_limits(cost, r, b, limits)}
    best = max(by_batch, key=lambda b: by_batch[b]["matmul_fraction"])
    return {"input": {"height": h, "width": w}, "weights": "random (speed only)", "cost": cost,
            "by_batch": by_batch, "best_batch": best, "matmul_fraction": by_batch[best]["matmul_fraction"]}


def default_threads() -> list[int]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return sorted({1, max(1, cores // 2), cores})
