"""NFormer parity with the official module (reference vectors in ../shared/specs/nformer_vectors) and
equivalence of the sparse O(N*k) path with the dense official formulation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.nformer import NFormer, NFormerConfig, from_official_state_dict
from tests.shared_data import require_shared_data

RTOL = 1e-5  # the bar: relative to the largest magnitude of the reference array


def reference_files():
    root = require_shared_data().parent / "specs" / "nformer_vectors"
    files = sorted(root.glob("*.npz"))
    assert len(files) >= 5, f"expected the five reference files in {root}"
    return files


def load_reference(path):
    arrays = np.load(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    hp = meta["hyper_parameters"]
    params = {k.removeprefix("param/"): arrays[k] for k in arrays.files if k.startswith("param/")}
    cfg = NFormerConfig(dim=hp["N_EMBD"], heads=hp["N_HEAD"], layers=hp["N_LAYER"], topk=hp["TOPK"],
                        landmarks=hp["LANDMARK"], dropout=0.0, num_classes=params["classifier.weight"].shape[0])
    model = NFormer(cfg)
    model.load_state_dict(from_official_state_dict(params), strict=True)  # every official name is mapped
    model.train("train" in meta["mode"])
    return arrays, model


def assert_close(actual: torch.Tensor, expected: np.ndarray, what: str):
    actual = actual.detach().numpy()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    error = np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12)
    assert error <= RTOL, f"{what}: relative error {error:.2e} > {RTOL}"


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "sparse"])
def test_reproduces_every_official_reference_file(dense):
    torch.set_num_threads(1)
    for path in reference_files():
        arrays, model = load_reference(path)
        trace: dict = {}
        with torch.no_grad():
            out = model(torch.from_numpy(arrays["input"]), landmarks=torch.from_numpy(arrays["landmarks"]),
                        dense=dense, trace=trace)
        name = path.stem
        if model.training:
            logits, pre_bn = out
            assert_close(pre_bn, arrays["output"], f"{name} train-mode pre-BN output")
            assert_close(logits, arrays["output_cls_score"], f"{name} logits")
        else:
            assert_close(out, arrays["output"], f"{name} output")
            assert_close(trace["layers"][-1]["out"], arrays["output_pre_bn"], f"{name} pre-BN output")
        np.testing.assert_array_equal(trace["neighbors"].numpy(), arrays["topk_indices"], err_msg=f"{name} top-k")
        layer0 = trace["layers"][0]
        assert_close(layer0["logits"], arrays["layer0_logits"], f"{name} layer-0 logits")
        assert_close(layer0["attention"], arrays["layer0_attn"], f"{name} layer-0 attention")
        assert_close(layer0["heads_out"], arrays["layer0_attn_heads_out"], f"{name} layer-0 heads")
        # the mask: where the reference attention is non-zero is exactly where ours may attend
        mask = arrays["layer0_reciprocal_mask"].astype(bool)
        np.testing.assert_array_equal(layer0["attention"][0, 0].numpy() > 0, mask, err_msg=f"{name} mask")
        for i, layer in enumerate(trace["layers"]):
            assert_close(layer["out"], arrays[f"block{i}_out"], f"{name} block {i}")


def random_model(dim=32, layers=2, topk=8, landmarks=4, seed=0) -> NFormer:
    torch.manual_seed(seed)
    model = NFormer(NFormerConfig(dim=dim, heads=2, layers=layers, topk=topk, landmarks=landmarks,
                                  dropout=0.0, num_classes=7))
    with torch.no_grad():  # away from the near-identity init, so every part matters
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        model.bottleneck.running_mean.normal_()
        model.bottleneck.running_var.uniform_(0.5, 2.0)
    return model.double().eval()  # float64: the two paths' equality, not float32 rounding, is under test


@pytest.mark.parametrize("n", [1, 3, 8, 50, 400])
def test_sparse_path_equals_dense_path(n):
    model = random_model()
    z = torch.randn(2, n, 32, dtype=torch.float64)
    with torch.no_grad():
        sparse, dense = model(z), model(z, dense=True)
    assert sparse.shape == (2, n, 32)
    torch.testing.assert_close(sparse, dense, rtol=1e-9, atol=1e-9)


def test_sparse_path_equals_dense_path_in_training_gradients_included():
    model = random_model().train()
    z = torch.randn(1, 60, 32, dtype=torch.float64)
    landmarks = torch.tensor([[1, 5, 9, 30], [0, 2, 40, 59]])
    grads = []
    for dense in (True, False):
        model.zero_grad()
        logits, pre_bn = model(z, landmarks=landmarks, dense=dense)
        (logits.square().mean() + pre_bn.square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)


def test_inference_is_deterministic_and_landmarks_are_injectable():
    model = random_model()
    z = torch.randn(1, 100, 32, dtype=torch.float64)
    with torch.no_grad():
        first, again = model(z), model(z)
        other = model(z, landmarks=torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other), "landmarks are injected and they matter"


def test_classifier_is_sized_to_the_training_identities_and_layers_start_identical():
    model = NFormer(NFormerConfig(dim=64, heads=2, layers=3, num_classes=123))
    assert model.classifier.weight.shape == (123, 64)
    first = model.blocks[0].state_dict()
    for block in model.blocks[1:]:
        for name, value in block.state_dict().items():
            torch.testing.assert_close(value, first[name])
    assert model.bottleneck.bias.requires_grad is False
