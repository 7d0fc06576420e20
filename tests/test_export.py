"""Export: ONNX bundle with dynamic batch, checked against torch; a disagreeing export is refused."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from index.bundle import load_bundle, sha256_file
from models.export import ExportMismatch, check_onnx_matches_torch, export_bundle, export_onnx
from models.reid_model import NormalizedEncoder
from models.synthetic import make_synthetic
from models.train import TrainConfig, load_trained_model, train
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


def _nformer_checkpoint(path, dim, seed, noise=0.05):
    from dataclasses import asdict

    from models.nformer import NFormer, NFormerConfig

    torch.manual_seed(seed)
    model = NFormer(NFormerConfig(dim=dim, heads=2, layers=2, topk=5, landmarks=3, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    torch.save({"nformer_config": asdict(model.cfg), "nformer": model.state_dict(), "config": {"seed": seed},
                "epoch": 1}, path)
    return path


def test_attach_nformer_replaces_a_bundles_nformer_and_leaves_the_encoder(tmp_path):
    from conftest import write_tiny_bundle
    from index.bundle import NFORMER_INT8_FILE as INT8_FILE, NFormerSpec
    from index.refine import NeighborTransformer, sample_landmarks, topk_neighbors
    from models.export import attach_nformer
    from models.nformer_train import load_trained_nformer

    bundle = write_tiny_bundle(tmp_path / "bundle", name="attach")
    before = json.loads((bundle / "model.json").read_text())
    dim = before["embedding_dim"]
    x = np.random.default_rng(0).standard_normal((30, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    outputs = []
    for seed in (0, 1):  # attach, then replace with other weights
        ckpt = _nformer_checkpoint(tmp_path / f"nformer{seed}.pt", dim, seed)
        card = attach_nformer(bundle, ckpt)
        load_bundle(bundle)  # every listed file's sha256 verifies
        assert card["files"]["encoder.onnx"] == before["files"]["encoder.onnx"]
        assert card["version"] == before["version"] and card["nformer"]["stage2"] == {"seed": seed}
        assert INT8_FILE in card["files"] and "int8" in card["nformer"]
        spec = NFormerSpec.from_card(card["nformer"])
        got = NeighborTransformer(bundle / "nformer.onnx", spec)(x)
        model = load_trained_nformer(ckpt)
        with torch.no_grad():  # the module's training-path forward, not the export path
            expected = torch.nn.functional.normalize(model(
                torch.from_numpy(x)[None], landmarks=torch.from_numpy(sample_landmarks(30, 2, 3)),
                neighbors=torch.from_numpy(topk_neighbors(x, 5))[None])[0], dim=-1).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        outputs.append(got)
    assert not np.allclose(outputs[0], outputs[1])

    wrong = _nformer_checkpoint(tmp_path / "wide.pt", dim * 2, 2)
    with pytest.raises(ValueError, match="NFormer width"):
        attach_nformer(bundle, wrong)
    assert json.loads((bundle / "model.json").read_text())["nformer"]["stage2"] == {"seed": 1}


def test_offline_readers_refuse_a_card_that_does_not_match_its_files(tmp_path):
    """`reid evaluate` and the benchmark read a bundle through index/bundle.py, with the service's sha256 check."""
    from conftest import write_tiny_bundle
    from index.bundle import BundleError
    from models.evaluate import BundleEncoder
    from models.refine_eval import bundle_refiner

    bundle = write_tiny_bundle(tmp_path / "bundle")
    for read in (BundleEncoder, bundle_refiner):  # an intact bundle reads
        read(bundle)
    with open(bundle / "encoder.onnx", "ab") as f:
        f.write(b"tampered")
    for read in (BundleEncoder, bundle_refiner):
        with pytest.raises(BundleError, match="sha256"):
            read(bundle)
