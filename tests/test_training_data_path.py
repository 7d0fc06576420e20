"""The training data path of issue 14: decoded uint8 images in memory, per-batch augmentation in torch,
channels_last, frozen front stages, Lite1/Lite2, GeM, flip-averaged embeddings, warm restarts with lineage."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.backbones import build_backbone
from models.data.batch_augment import Augmentation, BatchAugment, DecodedImages
from models.data.datasets import Sample, market1501
from models.data.transforms import InputSpec, TestTransform
from models.export import export_bundle
from models.reid_model import NormalizedEncoder, ReIDModel
from models.synthetic import make_synthetic
from models.train import TrainConfig, load_trained_model, train

ROOT = Path(__file__).resolve().parents[1]
SPEC = InputSpec(64, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, n_train_ids=24, n_test_ids=12, cameras=2, images_per_id_per_cam=2, seed=3)
    return root


def test_decoded_images_are_what_the_test_transform_sees(synthetic):
    samples = market1501(synthetic).train[:5]
    decoded = DecodedImages(samples, 64, 32, progress=False)
    assert decoded.images.dtype == torch.uint8 and decoded.images.shape == (5, 3, 64, 32)
    plain = BatchAugment(SPEC, Augmentation(flip_p=0, pad=0, erase_p=0))(decoded.images)
    expected = np.stack([TestTransform(SPEC)(Image.open(s.path).convert("RGB")) for s in samples])
    assert np.allclose(plain.numpy(), expected, atol=1e-6)
    assert decoded.labels.tolist() == [s.pid for s in samples]


def test_features_of_decoded_images_equal_the_files_features(synthetic):
    """GRACL embeds its decoded training set every epoch instead of re-reading the files: same features."""
    from models.features import extract_decoded_features, extract_features

    samples = market1501(synthetic).train[:10]
    torch.manual_seed(0)
    model = ReIDModel("efficientnet_lite0", 4, pretrained=False, embedding_dim=16)
    decoded = DecodedImages(samples, SPEC.height, SPEC.width, progress=False)
    from_files = extract_features(model, samples, SPEC, batch_size=4)
    from_memory = extract_decoded_features(model, decoded.images, SPEC, batch_size=3)
    assert from_memory.shape == from_files.shape == (10, 16)
    assert np.allclose(from_memory, from_files, atol=1e-4)


def test_batch_augmentation_flips_pads_and_erases():
    gradient = torch.arange(32, dtype=torch.uint8).repeat(2, 3, 64, 1) * 8  # left dark, right bright
    normalised = BatchAugment(SPEC, Augmentation(flip_p=0, pad=0, erase_p=0))(gradient)
    flipped = BatchAugment(SPEC, Augmentation(flip_p=1, pad=0, erase_p=0))(gradient)
    assert torch.equal(flipped, normalised.flip(3))
    assert flipped.is_contiguous(memory_format=torch.channels_last)

    padded = BatchAugment(SPEC, Augmentation(flip_p=0, pad=10, erase_p=0), seed=1)
    shifted = [padded(gradient) for _ in range(10)]
    assert any(not torch.equal(s, normalised) for s in shifted)
    assert all(s.shape == (2, 3, 64, 32) for s in shifted)
    assert any((s == 0).any() for s in shifted)  # the pad is the mean colour: 0 after normalisation

    erased = BatchAugment(SPEC, Augmentation(flip_p=0, pad=0, erase_p=1), seed=2)(gradient)
    changed = (erased != normalised).any(dim=1)  # [B,H,W]: which pixels the erasing touched
    for image in changed:
        area = image.sum().item()
        assert 0.02 * 64 * 32 * 0.5 <= area <= 0.4 * 64 * 32 * 1.1
        rows, cols = image.any(1).nonzero(), image.any(0).nonzero()  # one rectangle
        assert area == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_batch_augmentation_is_seeded():
    images = torch.randint(0, 255, (4, 3, 64, 32), dtype=torch.uint8)
    a = BatchAugment(SPEC, Augmentation(color_jitter=0.2), seed=5)(images)
    b = BatchAugment(SPEC, Augmentation(color_jitter=0.2), seed=5)(images)
    c = BatchAugment(SPEC, Augmentation(color_jitter=0.2), seed=6)(images)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_colour_jitter_changes_colours_within_range():
    grey = torch.full((8, 3, 16, 8), 128, dtype=torch.uint8)
    grey[:, 0] = 200  # a reddish patch: saturation has something to act on
    off = BatchAugment(SPEC, Augmentation(flip_p=0, pad=0, erase_p=0))(grey)
    on = BatchAugment(SPEC, Augmentation(flip_p=0, pad=0, erase_p=0, color_jitter=0.3), seed=0)(grey)
    assert not torch.allclose(on, off)
    assert on.min() >= -1 - 1e-6 and on.max() <= 1 + 1e-6  # stayed within [0, 255] before normalising


@pytest.mark.parametrize("name, width", [("efficientnet_lite1", 320), ("efficientnet_lite2", 352)])
def test_larger_lite_backbones_load_their_packaged_weights_strictly(name, width):
    backbone = build_backbone(name, pretrained=True)
    assert backbone._blocks[-1]._project_conv.out_channels == width
    assert backbone(torch.zeros(1, 3, 64, 32)).shape == (1, 1280, 4, 2)


def test_frozen_front_keeps_imagenet_weights_and_statistics():
    model = ReIDModel("efficientnet_lite0", 10, pretrained=True, embedding_dim=32)
    model.freeze_front(2)
    stem_before = model.backbone._conv_stem.weight.clone()
    stats_before = model.backbone._bn0.running_mean.clone()
    later = model.backbone._blocks[5]._project_conv.weight
    later_before = later.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    features, logits = model(torch.randn(4, 3, 64, 32))
    logits.sum().backward()
    optimizer.step()
    assert torch.equal(model.backbone._conv_stem.weight, stem_before)
    assert torch.equal(model.backbone._bn0.running_mean, stats_before)  # frozen BN stays in eval mode
    assert not torch.equal(later, later_before)
    model.set_backbone_trainable(True)  # the head-only epochs end: the front stays frozen
    assert not model.backbone._conv_stem.weight.requires_grad and later.requires_grad
    frozen_blocks = model.backbone.stage_ends[1]
    assert not any(p.requires_grad for b in model.backbone._blocks[:frozen_blocks] for p in b.parameters())
    assert all(p.requires_grad for b in model.backbone._blocks[frozen_blocks:] for p in b.parameters())


def test_gem_pooling_and_flip_average_export_match_torch(tmp_path):
    """Both change the exported graph: the ONNX export check must still hold."""
    from models.export import check_onnx_matches_torch, export_onnx

    torch.manual_seed(0)
    model = ReIDModel("efficientnet_lite0", 10, pretrained=True, embedding_dim=32, pooling="gem").eval()
    images = np.random.default_rng(0).standard_normal((8, 3, 64, 32)).astype(np.float32)
    for flip in (False, True):
        encoder = NormalizedEncoder(model, flip_average=flip).eval()
        export_onnx(encoder, SPEC, tmp_path / f"e{flip}.onnx")
        parity = check_onnx_matches_torch(encoder, tmp_path / f"e{flip}.onnx", images)
        assert parity["batch8_max_abs_diff"] < 1e-4
    x = torch.from_numpy(images)
    plain, flipped = NormalizedEncoder(model)(x), NormalizedEncoder(model, flip_average=True)(x)
    mirrored = NormalizedEncoder(model, flip_average=True)(x.flip(3))
    assert torch.allclose(flipped, mirrored, atol=1e-5)  # the mirror image embeds the same
    assert not torch.allclose(plain, flipped, atol=1e-3)


def tiny(root, **overrides) -> TrainConfig:
    base = dict(train_data=[str(root)], eval_data=[], backbone="efficientnet_lite0", height=64, width=32, p=4, k=2,
                epochs=1, max_batches_per_epoch=2, freeze_backbone_epochs=0, warmup_epochs=0.1, decay_epochs=[],
                embedding_dim=32, eval_every=0)
    return TrainConfig(**{**base, **overrides})


def test_warm_restart_from_a_bundle_records_the_lineage(synthetic, tmp_path):
    train(tiny(synthetic, frozen_stages=2), tmp_path / "first", resume=False)
    first = load_trained_model(tmp_path / "first" / "last.pt")[2]
    images = [s.path for s in market1501(synthetic).train[:8]]
    export_bundle(tmp_path / "first" / "last.pt", tmp_path / "bundle", images)

    # cycle 2: from the bundle, other data (the classifier is new), a larger input
    other = tmp_path / "other"
    make_synthetic(other, n_train_ids=10, n_test_ids=4, cameras=2, images_per_id_per_cam=2, seed=9)
    cfg = tiny(other, init=str(tmp_path / "bundle" / "weights.pt"), height=96, width=48, epochs=2, frozen_stages=2)
    train(cfg, tmp_path / "second", resume=False)
    model, spec, second = load_trained_model(tmp_path / "second" / "last.pt")
    lineage = second["lineage"]
    assert [c["init"] for c in lineage] == ["imagenet", str(tmp_path / "bundle" / "weights.pt")]
    assert [c["input"] for c in lineage] == [[64, 32], [96, 48]]
    assert [c["epochs"] for c in lineage] == [1, 2] and all(c["minutes"] >= 0 for c in lineage)
    assert lineage[1]["data"] == [str(other)] and (spec.height, spec.width) == (96, 48)
    # the warm start carried the backbone: untouched frozen stem equals the first cycle's (fp16-rounded) weights
    assert torch.allclose(model.backbone._conv_stem.weight, first["model"]["backbone._conv_stem.weight"], atol=1e-3)

    card = export_bundle(tmp_path / "second" / "last.pt", tmp_path / "bundle2", images)
    assert card["lineage"] == json.loads(json.dumps(lineage))


def test_warm_restart_refuses_a_checkpoint_of_another_architecture(synthetic, tmp_path):
    train(tiny(synthetic), tmp_path / "lite0", resume=False)
    with pytest.raises(ValueError, match="does not fit"):
        train(tiny(synthetic, init=str(tmp_path / "lite0" / "last.pt"), backbone="efficientnet_lite1"),
              tmp_path / "lite1", resume=False)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        train(tiny(synthetic, init=str(tmp_path / "missing.pt")), tmp_path / "none", resume=False)


def test_init_accepts_a_bundle_directory(tmp_path):
    from scripts.cli import init_checkpoint

    bundle = ROOT / "service" / "default_bundle"
    assert init_checkpoint(str(bundle)) == str(bundle / "weights.pt")
    assert init_checkpoint("runs/x/last.pt") == "runs/x/last.pt"
    with pytest.raises(SystemExit, match="no weights.pt"):
        init_checkpoint(str(tmp_path))


def test_weight_average_is_the_mean_of_the_epoch_weights():
    from models.weight_average import WeightAverage

    torch.manual_seed(0)
    model, average, seen = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)), WeightAverage(), []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(5, 3))  # moves the BN statistics too
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        average.update(model)
    target = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average.copy_into(target)
    for key, value in target.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, sum(s[key] for s in seen) / 3, atol=1e-6), key
    restored = WeightAverage()
    restored.load_state_dict(average.state_dict())
    assert restored.count == 3


def test_batchnorm_reestimation_leaves_the_frozen_front_alone():
    from models.weight_average import reestimate_batchnorm

    model = ReIDModel("efficientnet_lite0", 10, pretrained=True, embedding_dim=32)
    model.freeze_front(2)
    front_before = model.backbone._bn0.running_mean.clone()
    batches = [torch.randn(4, 3, 64, 32) + 3.0 for _ in range(3)]  # far from ImageNet's statistics
    reestimate_batchnorm(model, iter(batches), 3)
    assert torch.equal(model.backbone._bn0.running_mean, front_before)
    # the BNNeck's statistics are now the plain mean over every batch it saw, not an exponential one
    seen = []
    model.bottleneck.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    reestimate_batchnorm(model, iter(batches), 3)
    assert len(seen) == 3
    assert torch.allclose(model.bottleneck.running_mean, torch.cat(seen).mean(0), atol=1e-5)
    assert not model.training and model.bottleneck.momentum == 0.1


def test_weight_averaging_run_saves_and_evaluates_the_average(synthetic, tmp_path):
    """--average-from: epochs 2..3 averaged; averaged.pt is a checkpoint like last.pt with other weights,
    logged with its evaluation, and a resumed finished run keeps it."""
    cfg = tiny(synthetic, epochs=3, eval_data=[str(synthetic)], average_from=2, frozen_stages=2)
    result = train(cfg, tmp_path / "run", resume=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["averaged_epochs"] == [2, 3] and result == log[-1]["eval"]
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    averaged = load_trained_model(tmp_path / "run" / "averaged.pt")[2]
    assert last["average"]["count"] == 2 and "average" not in averaged
    key = "backbone._blocks.10._project_conv.weight"
    assert not torch.equal(last["model"][key], averaged["model"][key])
    assert averaged["lineage"][-1]["averaged_epochs"] == [2, 3] and "averaged_epochs" not in last["lineage"][-1]
    assert last["lineage"][-1]["averaged_from"] == averaged["lineage"][-1]["averaged_from"] == 2
    images = [s.path for s in market1501(synthetic).train[:8]]
    card = export_bundle(tmp_path / "run" / "averaged.pt", tmp_path / "bundle", images)
    assert card["lineage"][-1]["averaged_epochs"] == [2, 3]
    # a finished run started again trains nothing and averages nothing again
    assert train(cfg, tmp_path / "run", resume=True) == {}
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == len(log)
    # a run that stopped after its last epoch but before averaging averages on resume
    (tmp_path / "run" / "averaged.pt").unlink()
    assert train(cfg, tmp_path / "run", resume=True) == result
    assert load_trained_model(tmp_path / "run" / "averaged.pt")[2]["epoch"] == 3


def test_flip_study_evaluates_each_side(synthetic, tmp_path):
    from models.features import evaluate_model
    from models.flip_study import flip_study, study_markdown

    train(tiny(synthetic, epochs=1), tmp_path / "run", resume=False)
    results = flip_study(tmp_path / "run" / "last.pt", [str(synthetic)], 0)
    (name, sides), = results.items()
    model, spec, _ = load_trained_model(tmp_path / "run" / "last.pt")
    dataset = market1501(synthetic)
    for side, flip in (("none", False), ("both", True)):
        expected = evaluate_model(NormalizedEncoder(model, flip_average=flip), dataset, spec)
        assert abs(sides[side].mAP - expected.mAP) < 1e-6, side
    assert sides["query"].mAP not in (sides["none"].mAP, sides["both"].mAP)  # a ranking of its own
    table = study_markdown({"tiny": results})
    assert table.count("| tiny |") == 3 and "+0.00 |" in table.splitlines()[2]
