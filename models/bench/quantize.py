"""INT8 static quantisation of the encoder (QDQ, per-channel weights, MinMax calibration over real images
from the training half of the shared protocol) and what it changes: speed beside fp32 at the same batch,
rank-1 / mAP on each shared protocol's split 0."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from . import data
from .encoder import ort_rate, session
from .features import embed, protocol_features, score


class _Reader:
    """onnxruntime's CalibrationDataReader protocol: one dict of inputs per call, None when done."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = 8):
        self._batches = iter([{input_name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._batches, None)


def quantize(onnx_path: Path, out_path: Path, calibration: np.ndarray) -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    CalibrationDataReader.register(_Reader)
    prepared = out_path.with_name("prepared.onnx")
    try:  # shape inference + fusions first, as onnxruntime recommends; the raw graph also works
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
    except Exception:  # an exporter quirk must not cost the section
        prepared = onnx_path
    name = session(onnx_path).get_inputs()[0].name
    quantize_static(str(prepared), str(out_path), _Reader(calibration, name), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out_path


def run(bundle_dir: Path, batch: int, cfg) -> dict:
    """``cfg``: calibration_images, seconds, protocols."""
    card = data.card(bundle_dir)
    onnx_path = bundle_dir / "encoder.onnx"
    calibration, source = data.images(card, cfg.calibration_images, part="train", seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = quantize(onnx_path, Path(tmp) / "encoder.int8.onnx", calibration)
        fp32, int8 = session(onnx_path), session(int8_path)
        x, _ = data.images(card, batch)
        speed = {"batch": batch, "fp32": ort_rate(fp32, x, batch, cfg.seconds),
                 "int8": ort_rate(int8, x, batch, cfg.seconds)}
        speed["speedup"] = speed["int8"] / speed["fp32"]
        accuracy, skipped = {}, []
        for name in cfg.protocols:
            dataset = data.protocol(name)
            if dataset is None:
                skipped.append(name)
                continue
            before = score(dataset, *protocol_features(onnx_path, card, dataset, fp32))
            q, g = protocol_features(int8_path, card, dataset, int8)
            after = score(dataset, q, g)
            accuracy[dataset.name] = {
                "fp32": {"rank1": before.ranks["rank1"], "mAP": before.mAP},
                "int8": {"rank1": after.ranks["rank1"], "mAP": after.mAP},
                "rank1_change_points": 100 * (after.ranks["rank1"] - before.ranks["rank1"]),
                "mAP_change_points": 100 * (after.mAP - before.mAP)}
    worst = min((a["rank1_change_points"] for a in accuracy.values()), default=None)
    return {"format": "QDQ, per-channel int8 weights, uint8 activations, MinMax calibration",
            "calibration": source, "speed": speed, "accuracy": accuracy, "skipped_protocols": skipped,
            "worst_rank1_change_points": worst}
