"""The bundle that ships with the repository: small, intact, documented."""

import json

from index.bundle import load_bundle, sha256_file
from service.settings import DEFAULT_BUNDLE_DIR


def test_default_bundle_is_intact_and_documented():
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)  # refuses a card that does not match its files
    card = json.loads((DEFAULT_BUNDLE_DIR / "model.json").read_text())
    size = sum(p.stat().st_size for p in DEFAULT_BUNDLE_DIR.iterdir())
    assert size < 40 * 1024 * 1024  # encoder 15 + NFormer 13 (+ 3 int8) + float16 weights.pt 8 MB: git and the image stay small
    assert card["files"]["encoder.onnx"] == sha256_file(DEFAULT_BUNDLE_DIR / "encoder.onnx")
    assert bundle.embedding_dim == card["embedding_dim"]
    for protocol in ("cuhk03/split0", "prid450s/split0", "prid2011/split0"):
        figures = card["evaluation"][protocol]
        assert {"mAP", "rank1", "rank5", "rank10"} <= set(figures)
    assert set(card["training_data"]["datasets"]) == {"cuhk03", "prid450s", "prid2011", "viper-all", "cuhk01-all",
                                                      "pku-reid-all"}
    # the chain of warm restarts that made it (make train-default): ImageNet, then four cycles from the last;
    # the last two at the bundle's input size (192x96), the earlier ones at 128x64
    lineage = card["lineage"]
    assert lineage[0]["init"] == "imagenet" and len(lineage) == 5
    assert [c["epochs"] for c in lineage] == [12, 66, 20, 26, 16]
    assert all(c["split"] == 0 for c in lineage)
    assert [c["input"] for c in lineage] == [[128, 64]] * 3 + [[card["input"]["height"], card["input"]["width"]]] * 2
    assert card["input"]["height"] == 192 and card["input"]["width"] == 96
    # cycle 5 ran with weight averaging, but its last epoch ships (split 1 chose it: docs/cycle5-levers.md)
    assert lineage[-1]["averaged_from"] == 2 and "averaged_epochs" not in lineage[-1]
    assert card["recipe"]["lr"] == 3.5e-5
    assert bundle.query_flip  # queries flip-averaged, chosen on split 1 too


def test_default_bundle_ships_the_nformer_with_its_refinement_figures():
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    card = bundle.card
    assert card["files"]["nformer.onnx"] == sha256_file(DEFAULT_BUNDLE_DIR / "nformer.onnx")
    assert card["nformer"]["dim"] == card["embedding_dim"] == 256
    assert card["nformer"]["stage2_epochs_trained"] >= 1
    refinement = card["evaluation"]["refinement"]
    for protocol in ("cuhk03/split0", "prid450s/split0", "prid2011/split0"):
        assert {"none", "joint", "local@50", "local@200", "kreciprocal@200"} <= set(refinement[protocol])
    cuhk03 = refinement["cuhk03/split0"]
    assert cuhk03["joint"]["mAP"] > cuhk03["none"]["mAP"]  # the paper's claim, on the multi-shot protocol


def test_default_bundle_weights_reproduce_its_encoder():
    """`weights.pt` (float16, for `reid adapt`) is the same network as `encoder.onnx`, to float16 rounding."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from models.reid_model import NormalizedEncoder
    from models.train import load_trained_model

    model, spec, _ = load_trained_model(DEFAULT_BUNDLE_DIR / "weights.pt")
    x = np.random.default_rng(0).standard_normal((4, 3, spec.height, spec.width)).astype(np.float32)
    with torch.no_grad():
        ours = NormalizedEncoder(model).eval()(torch.from_numpy(x)).numpy()
    onnx = ort.InferenceSession(str(DEFAULT_BUNDLE_DIR / "encoder.onnx")).run(None, {"images": x})[0]
    assert (ours * onnx).sum(1).min() > 0.999  # both L2-normalised: cosine
