"""The INT8 NFormer that serves `local` and `joint` refinement: ONNX Runtime dynamic quantisation of the
MatMul weights (int8, per tensor; activations quantised per call, so no calibration set is needed).

Why: NFormer's cost is its dense layers (about 6.3 MFLOP per token over 4 layers); on an AVX2 CPU int8
MatMuls run about 1.5x the fp32 rate, and the refined features stay within cosine 0.9999 of fp32. The
check below refuses a quantised graph that drifts further than ``MIN_COSINE`` on clustered features.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from index.bundle import NFORMER_FILE, NFORMER_INT8_FILE, read_card, sha256_file, write_card
from index.refine import sample_landmarks, topk_neighbors

MIN_COSINE = 0.999  # per refined feature, int8 vs fp32
CHECK_SIZES = (7, 64, 301)


class QuantisationDrift(RuntimeError):
    """The quantised NFormer's features are further from fp32 than MIN_COSINE."""


def quantize(fp32_path: Path, out_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the quantiser writes helper files next to its output: staged beside the bundle, so the rename is atomic
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        staged = Path(tmp) / out_path.name
        quantize_dynamic(str(fp32_path), str(staged), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        staged.replace(out_path)


def check(fp32_path: Path, int8_path: Path, spec: dict, seed: int = 0) -> dict:
    """Lowest and mean cosine between fp32 and int8 refined features at each size (clustered features, so
    reciprocal neighbourhoods are non-trivial)."""
    import onnxruntime as ort

    fp32, int8 = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32_path, int8_path))
    rng, out = np.random.default_rng(seed), {}
    for n in CHECK_SIZES:
        centres = rng.standard_normal((max(1, n // 5), spec["dim"]))
        x = centres[rng.integers(len(centres), size=n)] + 0.5 * rng.standard_normal((n, spec["dim"]))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        feeds = {"features": x, "neighbors": topk_neighbors(x, spec["topk"]),
                 "landmarks": sample_landmarks(n, spec["layers"], spec["landmarks"], spec.get("landmark_seed", 0))}
        cos = np.sum(fp32.run(["refined"], feeds)[0] * int8.run(["refined"], feeds)[0], axis=1)
        out[f"n{n}"] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        if cos.min() < MIN_COSINE:
            raise QuantisationDrift(f"int8 NFormer drifts from fp32 at N={n}: cosine {cos.min():.5f} < {MIN_COSINE}")
    return out


def add_to_bundle(bundle_dir: str | Path) -> dict:
    """Write ``nformer.int8.onnx`` next to the bundle's ``nformer.onnx``, checked, and list it in the card
    (``files`` and ``nformer.int8``); :class:`QuantisationDrift` (and no file) if it drifts. The encoder and the
    bundle's version are untouched: stored vectors stay valid."""
    bundle_dir = Path(bundle_dir)
    card = read_card(bundle_dir)
    if NFORMER_FILE not in card.get("files", {}):
        raise ValueError(f"{bundle_dir} has no {NFORMER_FILE} to quantise")
    fp32_path, int8_path = bundle_dir / NFORMER_FILE, bundle_dir / NFORMER_INT8_FILE
    quantize(fp32_path, int8_path)
    try:
        drift = check(fp32_path, int8_path, card["nformer"])
    except QuantisationDrift:
        int8_path.unlink()
        raise
    entry = {"file": NFORMER_INT8_FILE,
             "method": "onnxruntime dynamic quantisation: MatMul weights int8 per tensor, activations uint8 per call",
             "check": drift}
    card["nformer"]["int8"] = entry
    card["files"][NFORMER_INT8_FILE] = sha256_file(int8_path)
    write_card(bundle_dir, card)
    return entry
