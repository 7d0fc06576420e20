"""Training pieces, and a tiny real training run on synthetic data: loss falls, mAP rises."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.backbones import build_backbone
from models.data.datasets import market1501
from models.data.sampler import PKBatchSampler
from models.data.transforms import InputSpec, TestTransform, TrainTransform
from index.metrics import evaluate_features
from models.features import evaluate_model
from models.losses import BatchHardTripletLoss, CenterLoss, CrossEntropyLabelSmooth
from models.reid_model import ReIDModel
from models.synthetic import make_synthetic
from models.train import TrainConfig, learning_rate_factor, load_trained_model, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, n_train_ids=40, n_test_ids=20, cameras=3, images_per_id_per_cam=3, seed=1)
    return root


def tiny_config(root, **overrides) -> TrainConfig:
    """A ResNet-18 from scratch at 64x32: small enough to learn visibly in about a minute on 2 cores."""
    cfg = TrainConfig(train_data=[str(root)], eval_data=[str(root)], backbone="resnet18", pretrained=False,
                      height=64, width=32, p=8, k=4, epochs=8, warmup_epochs=0.5, decay_epochs=[],
                      freeze_backbone_epochs=0, backbone_lr_factor=1.0, lr=1e-3, eval_every=0, threads=2,
                      embedding_dim=0)  # the pooled 512-d feature: the projection is exercised elsewhere
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_pk_sampler_batches_are_identity_balanced():
    labels = [i // 6 for i in range(60)] + [10, 11]  # ids 10 and 11 have one image each
    sampler = PKBatchSampler(labels, p=4, k=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == 12
        ids = [labels[i] for i in batch]
        for start in range(0, 12, 3):
            assert len(set(ids[start:start + 3])) == 1
    assert list(sampler) == batches  # same epoch, same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_pk_sampler_shards_each_batch_across_processes():
    labels = [i // 4 for i in range(80)]
    whole = list(PKBatchSampler(labels, p=8, k=4, seed=2))
    shards = [list(PKBatchSampler(labels, p=8, k=4, seed=2, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*shards)] == whole


def test_transforms_shape_and_normalisation():
    from PIL import Image

    spec = InputSpec(64, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    white = Image.new("RGB", (20, 50), (255, 255, 255))
    out = TestTransform(spec)(white)
    assert out.shape == (3, 64, 32) and out.dtype == np.float32 and np.allclose(out, 1.0)
    aug = TrainTransform(spec, seed=0)
    outs = [aug(white) for _ in range(20)]
    assert all(o.shape == (3, 64, 32) for o in outs)
    assert any(not np.allclose(o, 1.0) for o in outs)  # padding/erasing changed something


def test_losses_behave():
    ce = CrossEntropyLabelSmooth(3, 0.1)
    logits = torch.tensor([[10.0, 0, 0], [0, 10.0, 0]])
    assert ce(logits, torch.tensor([0, 1])) < ce(logits, torch.tensor([1, 0]))
    triplet = BatchHardTripletLoss(0.3)
    separated = torch.tensor([[0.0, 0], [0, 0.1], [5, 5], [5, 5.1]])
    labels = torch.tensor([0, 0, 1, 1])
    assert triplet(separated, labels) == 0
    assert triplet(separated, torch.tensor([0, 1, 0, 1])) > 0
    center = CenterLoss(2, 2)
    with torch.no_grad():
        center.centers.copy_(torch.tensor([[0.0, 0.05], [5, 5.05]]))
    assert center(separated, labels) < 0.01


def test_backbone_parameter_names():
    lite = build_backbone("efficientnet_lite0", pretrained=True)  # packaged ImageNet weights, strict load
    assert lite(torch.zeros(1, 3, 64, 32)).shape == (1, 1280, 4, 2)  # last stride 1: /16
    r50 = build_backbone("resnet50", last_stride=1)
    names = set(r50.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer4.2.conv3.weight", "layer1.0.downsample.1.weight"} <= names
    assert r50(torch.zeros(1, 3, 64, 32)).shape == (1, 2048, 4, 2)
    r18 = build_backbone("resnet18", last_stride=2)
    assert r18(torch.zeros(1, 3, 64, 32)).shape == (1, 512, 2, 1)
    assert "layer3.1.conv2.weight" in r18.state_dict()


def test_learning_rate_schedule():
    cfg = TrainConfig(warmup_epochs=2, decay_epochs=[4, 6], decay_factor=0.1)
    assert learning_rate_factor(0, cfg) == pytest.approx(0.01)
    assert learning_rate_factor(1, cfg) == pytest.approx(0.505)
    assert learning_rate_factor(3, cfg) == 1.0
    assert learning_rate_factor(5, cfg) == pytest.approx(0.1)
    assert learning_rate_factor(6.5, cfg) == pytest.approx(0.01)


def chance_map(dataset, trials: int = 5) -> float:
    """mAP of random features: what 'above chance' is measured against."""
    rng = np.random.default_rng(0)
    q, g = dataset.query, dataset.gallery
    return float(np.mean([
        evaluate_features(rng.standard_normal((len(q), 8)), rng.standard_normal((len(g), 8)),
                          [s.pid for s in q], [s.pid for s in g], [s.camid for s in q], [s.camid for s in g]).mAP
        for _ in range(trials)
    ]))


def test_tiny_training_run_learns(synthetic, tmp_path):
    cfg = tiny_config(synthetic)
    dataset = market1501(synthetic)
    torch.manual_seed(cfg.seed)
    untrained = ReIDModel(cfg.backbone, 40, pretrained=False, last_stride=cfg.last_stride)
    before = evaluate_model(untrained, dataset, cfg.input_spec(untrained.backbone)).mAP
    after = train(cfg, tmp_path / "run", resume=False)[dataset.name]["mAP"]

    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log]
    assert len(losses) == cfg.epochs and losses[-1] < 0.7 * losses[0], losses
    chance = chance_map(dataset)
    assert after > before + 0.05, (before, after)
    assert after > 2.5 * chance, (chance, after)

    # resume: a finished run does not train again, and the checkpoint reloads for export
    assert train(cfg, tmp_path / "run", resume=True) == {}
    model, spec, state = load_trained_model(tmp_path / "run" / "last.pt")
    assert state["epoch"] == cfg.epochs and (spec.height, spec.width) == (64, 32)


def test_two_process_ddp_matches_one_process(synthetic, tmp_path):
    """torchrun, 2 CPU processes, gloo: the same global batches, so the loss curve matches within noise."""
    def run(nproc, run_dir):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "scripts.cli", "train", "--data", str(synthetic), "--eval-data", "--run-dir", str(run_dir),
               "--backbone", "resnet18", "--pretrained", "false", "--freeze-backbone-epochs", "0",
               "--backbone-lr-factor", "1", "--warmup-epochs", "0.5",
               "--height", "64", "--width", "32", "--epochs", "3", "--max-batches-per-epoch", "6",
               "--threads", "1", "--p", "8", "--k", "4", "--lr", "0.001", "--no-resume"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]

    one = run(1, tmp_path / "one")
    two = run(2, tmp_path / "two")
    assert len(one) == len(two) == 3
    assert two[-1] < two[0]
    for a, b in zip(one, two):
        assert abs(a - b) / a < 0.1, (one, two)


def test_epochs_longer_than_the_data_take_further_passes():
    from models.train import epoch_batches

    labels = [i // 4 for i in range(40)]  # 10 ids x 4 images: 2 batches of P=5 x K=4 per pass
    sampler = PKBatchSampler(labels, p=5, k=4, seed=0)
    one_pass = list(epoch_batches(sampler, 3, len(sampler)))
    sampler.set_epoch(3)
    assert one_pass == list(sampler)  # an ordinary epoch is the sampler's own
    longer = list(epoch_batches(sampler, 3, 5))
    assert len(longer) == 5 and longer[:2] == one_pass and longer[2:4] != one_pass
    assert list(epoch_batches(sampler, 3, 1)) == one_pass[:1]
