"""Export: ONNX bundle with dynamic batch, checked against torch; a disagreeing export is refused."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.export import ExportMismatch, check_onnx_matches_torch, export_bundle, export_onnx, sha256_file
from models.reid_model import NormalizedEncoder
from models.synthetic import make_synthetic
from models.train import TrainConfig, load_trained_model, train
from service.bundle import load_bundle
from service.embedder import Embedder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, n_train_ids=12, n_test_ids=6, cameras=2, images_per_id_per_cam=2, seed=3)
    run = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(train_data=[str(root)], eval_data=[], backbone="efficientnet_lite0", height=64, width=32,
                      p=4, k=2, epochs=1, max_batches_per_epoch=2, freeze_backbone_epochs=0, threads=2)
    train(cfg, run, resume=False)
    images = sorted(str(p) for p in (root / "query").iterdir())
    return run / "last.pt", images


def test_export_writes_a_checked_bundle_the_service_loads(checkpoint, tmp_path):
    ckpt, images = checkpoint
    out = tmp_path / "bundle"
    card = export_bundle(ckpt, out, images, name="test-model", version="1")
    assert sorted(p.name for p in out.iterdir()) == ["encoder.onnx", "model.json", "weights.pt"]
    assert card["files"]["encoder.onnx"] == sha256_file(out / "encoder.onnx")
    assert card["files"]["weights.pt"] == sha256_file(out / "weights.pt")
    model, spec, _ = load_trained_model(out / "weights.pt")  # what `reid adapt` starts from
    reference, _, _ = load_trained_model(ckpt)
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        if ours.is_floating_point():
            assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3), name  # float16 copy
    assert card["input"] == {"height": 64, "width": 32, "channel_order": "RGB", "scale": "1/255",
                             "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert card["embedding_dim"] == 256 and card["normalized"] is True  # the projection of the recipe
    assert card["export_check"]["batch8_max_abs_diff"] < 1e-4
    assert json.loads((out / "model.json").read_text()) == card

    # dynamic batch, unit-norm features, and the service's embedder agrees with torch on a real image
    session = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 17):
        feats = session.run(["features"], {"images": np.zeros((batch, 3, 64, 32), np.float32)})[0]
        assert feats.shape == (batch, 256)
        assert np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
    model, spec, _ = load_trained_model(ckpt)
    from models.data.transforms import TestTransform, load_rgb

    with torch.no_grad():
        expected = NormalizedEncoder(model)(torch.from_numpy(TestTransform(spec)(load_rgb(images[0]))[None])).numpy()
    served = Embedder(load_bundle(out)).embed_paths([images[0]], progress=False)
    assert np.allclose(served, expected, atol=1e-4)


def test_disagreeing_export_is_refused(checkpoint, tmp_path):
    ckpt, images = checkpoint
    model, spec, _ = load_trained_model(ckpt)
    encoder = NormalizedEncoder(model).eval()
    export_onnx(encoder, spec, tmp_path / "encoder.onnx")
    with torch.no_grad():  # the torch side drifts after export: the check must notice
        model.bottleneck.weight.mul_(-1.0)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 32)).astype(np.float32)
    with pytest.raises(ExportMismatch, match="differs from torch"):
        check_onnx_matches_torch(encoder, tmp_path / "encoder.onnx", x)


def test_export_without_images_is_refused(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="real images"):
        export_bundle(checkpoint[0], tmp_path / "b", [])
    assert not (tmp_path / "b").exists()
