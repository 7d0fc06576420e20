"""The speed side of the lever study (`models/lever_study.py`, `reid lever-study --report-only`): ONNX
Runtime img/s of every encoder the study trains, and the study's accuracy-against-speed plot. Measured with
the encoder section's session and timing, so the study's rates and the benchmark's are taken one way."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from index.bundle import ENCODER_FILE
from models.export import export_onnx
from models.lever_study import FLIP_ROW, LEVERS, STUDY_SPLIT, encoder_key
from models.reid_model import NormalizedEncoder, ReIDModel
from models.train import TrainConfig

from .encoder import ort_rate, session
from .plots import _plt, _save


def measure_encoder_rates(out: Path, seconds: float = 5.0, threads: int = 2) -> dict[str, float]:
    """ONNX Runtime img/s at batch 32 of every distinct exported encoder in the study (random weights: the
    speed does not depend on them), kept in `out/encoder_rates.json`."""
    path = out / "encoder_rates.json"
    rates = json.loads(path.read_text()) if path.exists() else {}
    variants = [(asdict(lever.config()), False) for lever in LEVERS]
    variants.append((asdict(TrainConfig()), True))
    for cfg, flip in variants:
        key = encoder_key(cfg, flip)
        if key in rates:
            continue
        model = ReIDModel(cfg["backbone"], 10, False, cfg["last_stride"], cfg["embedding_dim"], cfg["pooling"]).eval()
        spec = TrainConfig(**{k: cfg[k] for k in ("backbone", "height", "width")}).input_spec(model.backbone)
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / ENCODER_FILE
            export_onnx(NormalizedEncoder(model, flip_average=flip), spec, onnx_path)
            x = np.random.default_rng(0).standard_normal((32, 3, spec.height, spec.width)).astype(np.float32)
            rates[key] = round(ort_rate(session(onnx_path, threads=threads), x, 32, seconds), 1)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rates, indent=2))
    return rates


def plot_accuracy_vs_speed(results: list[dict], encoder_rates: dict[str, float], path: Path) -> Path:
    """CUHK03 mAP against the encoder's ONNX Runtime img/s: one point per candidate (accuracy per
    encoder-millisecond is what the default bundle is chosen by)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    target = f"cuhk03/split{STUDY_SPLIT}"
    for r in results:
        for flip, evaluation in ((False, r["evaluation"]), (True, r.get("flip_average_evaluation"))):
            rate = encoder_rates.get(encoder_key(r["config"], flip))
            if not evaluation or target not in evaluation or not rate:
                continue
            label = FLIP_ROW if flip else r["lever"]
            ax.scatter(rate, evaluation[target]["mAP"])
            ax.annotate(label, (rate, evaluation[target]["mAP"]), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
    left, right = ax.get_xlim()
    ax.set_xlim(left, right + 0.45 * (right - left))  # room for the labels of the fastest points
    ax.axvline(200, color="grey", linestyle="--", linewidth=1)
    ax.text(202, ax.get_ylim()[0], "200 img/s floor", fontsize=7, color="grey")
    ax.set_xlabel("encoder images / s (ONNX Runtime, batch 32, 2 threads)")
    ax.set_ylabel(f"{target} mAP")
    ax.set_title("lever study: accuracy against encoder speed")
    ax.grid(alpha=0.3)
    return _save(fig, path)
