"""The bundle that ships with the repository: small, intact, documented."""

import json

from models.export import sha256_file
from service.bundle import load_bundle
from service.settings import DEFAULT_BUNDLE_DIR


def test_default_bundle_is_intact_and_documented():
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)  # refuses a card that does not match its files
    card = json.loads((DEFAULT_BUNDLE_DIR / "model.json").read_text())
    size = sum(p.stat().st_size for p in DEFAULT_BUNDLE_DIR.iterdir())
    assert size < 32 * 1024 * 1024  # encoder 15 MB + NFormer 13 MB: git and the image stay small
    assert card["files"]["encoder.onnx"] == sha256_file(DEFAULT_BUNDLE_DIR / "encoder.onnx")
    assert bundle.embedding_dim == card["embedding_dim"]
    for protocol in ("cuhk03/split0", "prid450s/split0", "prid2011/split0"):
        figures = card["evaluation"][protocol]
        assert {"mAP", "rank1", "rank5", "rank10"} <= set(figures)
    assert set(card["training_data"]["datasets"]) == {"cuhk03", "prid450s", "prid2011", "viper-all"}


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
