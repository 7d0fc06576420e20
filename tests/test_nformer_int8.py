"""The int8 NFormer (dynamic MatMul quantisation) that serves local/joint refinement: written into a bundle
with its hash and its drift check, refused when it drifts, and picked by the service per REID_REFINE_PRECISION."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import add_nformer, write_tiny_bundle
from index.bundle import NFORMER_INT8_FILE as INT8_FILE, NFormerSpec, load_bundle
from index.refine import NeighborTransformer
from models.nformer_int8 import MIN_COSINE, QuantisationDrift, add_to_bundle, check
from service.settings import DEFAULT_BUNDLE_DIR, Settings
from service.state import load_refiner



@pytest.fixture
def bundle_copy(tmp_path):
    """A tiny NFormer nearer a trained one than the shared fixture (whose weights are pushed far off their
    init to change rankings visibly, and which int8 moves by cosine 0.998)."""
    return add_nformer(write_tiny_bundle(tmp_path / "bundle", name="tiny-int8"), noise=0.05)


def test_add_to_bundle_writes_a_checked_listed_graph(bundle_copy):
    entry = add_to_bundle(bundle_copy)
    card = json.loads((bundle_copy / "model.json").read_text())
    assert card["nformer"]["int8"] == entry and INT8_FILE in card["files"]
    assert all(c["min_cosine"] >= MIN_COSINE for c in entry["check"].values())
    load_bundle(bundle_copy)  # every listed file's sha256 verifies

    spec = NFormerSpec.from_card(card["nformer"])
    x = np.random.default_rng(1).standard_normal((40, spec.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    fp32 = NeighborTransformer(bundle_copy / "nformer.onnx", spec)(x)
    int8 = NeighborTransformer(bundle_copy / INT8_FILE, spec)(x)
    assert np.sum(fp32 * int8, axis=1).min() >= MIN_COSINE
    assert (bundle_copy / INT8_FILE).stat().st_size < (bundle_copy / "nformer.onnx").stat().st_size


def test_a_graph_that_drifts_is_refused(nformer_bundle, tmp_path):
    other = add_nformer(write_tiny_bundle(tmp_path / "other", name="other"), seed=1)  # other weights entirely
    spec = json.loads((nformer_bundle / "model.json").read_text())["nformer"]
    with pytest.raises(QuantisationDrift, match="drifts from fp32"):
        check(nformer_bundle / "nformer.onnx", other / "nformer.onnx", spec)
    bundle = shutil.copytree(nformer_bundle, tmp_path / "far")  # int8 moves these weights by cosine 0.998
    card_before = (bundle / "model.json").read_text()
    with pytest.raises(QuantisationDrift):
        add_to_bundle(bundle)
    assert not (bundle / INT8_FILE).exists() and (bundle / "model.json").read_text() == card_before


@pytest.mark.parametrize("precision, expected", [("int8", INT8_FILE), ("fp32", "nformer.onnx")])
def test_service_refines_with_the_precision_asked_for(bundle_copy, tmp_path, precision, expected):
    add_to_bundle(bundle_copy)
    settings = Settings(data_dir=tmp_path / "data", model_dir=bundle_copy, refine_precision=precision)
    assert load_refiner(load_bundle(bundle_copy), settings).nformer.path.name == expected


def test_int8_precision_falls_back_to_fp32_without_the_graph(nformer_bundle, tmp_path):
    settings = Settings(data_dir=tmp_path / "data", model_dir=nformer_bundle, refine_precision="int8")
    assert load_refiner(load_bundle(nformer_bundle), settings).nformer.path.name == "nformer.onnx"


def test_default_bundle_serves_its_int8_nformer(tmp_path):
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    assert all(c["min_cosine"] >= MIN_COSINE for c in bundle.card["nformer"]["int8"]["check"].values())
    assert load_refiner(bundle, Settings(data_dir=tmp_path / "data")).nformer.path.name == INT8_FILE
