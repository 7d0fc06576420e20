"""Supervised ReID training with the strong-baseline recipe (Luo et al. 2019): BNNeck, label-smoothed
cross-entropy + batch-hard triplet + center loss, Adam with linear warm-up and step decay, P x K batches.

Runs on one device or under `torchrun` (DistributedDataParallel; gloo on CPU, nccl on GPUs): every
process draws the same global batch list and trains on its own share of it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from .data.datasets import ReIDDataset, Sample, combine_for_training, load_dataset
from .data.sampler import PKBatchSampler
from .data.transforms import InputSpec, TrainTransform, load_rgb
from .features import evaluate_model
from .losses import BatchHardTripletLoss, CenterLoss, CrossEntropyLabelSmooth
from .reid_model import ReIDModel


@dataclass
class TrainConfig:
    train_data: list[str] = field(default_factory=lambda: ["cuhk03", "prid450s", "prid2011", "viper-all"])
    eval_data: list[str] = field(default_factory=lambda: ["cuhk03", "prid450s", "prid2011"])
    split: int = 0
    backbone: str = "efficientnet_lite0"
    pretrained: str | bool = True
    last_stride: int = 1  # the ReID convention: the last stage keeps its resolution
    embedding_dim: int = 256  # NFormer's width (the official encoder projects 2048 -> 256); 0 = backbone width
    # 128x64 rather than 256x128: ~4x faster on 2 CPU cores, and the shared images are 48-64 px wide
    # (PRID450S excepted), so a larger input only upsamples
    height: int = 128
    width: int = 64
    p: int = 8
    k: int = 4
    epochs: int = 12
    lr: float = 3.5e-4  # head (BNNeck + classifier)
    # The backbone at the head's rate once the head is warm. Measured: at 0.1x it hardly moved, the
    # classifier fitted the training ids on ImageNet features, and unseen ids did not improve.
    backbone_lr_factor: float = 1.0
    # First epochs train only the new head (torchreid's "fixbase"): gradients from a random 1,408-way
    # classifier are noise that would wreck the pretrained features before the head means anything.
    freeze_backbone_epochs: int = 2
    weight_decay: float = 5e-4
    warmup_epochs: float = 1
    decay_epochs: list[int] = field(default_factory=lambda: [9, 11])
    decay_factor: float = 0.1
    triplet_margin: float = 0.3
    label_smoothing: float = 0.1
    center_weight: float = 5e-4
    center_lr: float = 0.5
    eval_every: int = 4  # epochs; 0 = only after the last epoch
    seed: int = 0
    threads: int = 2  # torch intra-op threads; 0 = leave torch's default
    max_batches_per_epoch: int = 0  # 0 = full epochs; small values make quick smoke runs

    def input_spec(self, backbone_module) -> InputSpec:
        return InputSpec(self.height, self.width, tuple(backbone_module.input_mean), tuple(backbone_module.input_std))


class ImageSamples(torch.utils.data.Dataset):
    """Decoded images kept in memory (the shared sets are small), augmented on the fly."""

    def __init__(self, samples: list[Sample], transform):
        self.samples, self.transform = samples, transform
        self.images: dict[int, Image.Image] = {}

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        if index not in self.images:
            self.images[index] = load_rgb(self.samples[index].path)
        s = self.samples[index]
        return torch.from_numpy(self.transform(self.images[index])), s.pid, s.camid


def learning_rate_factor(epoch_float: float, cfg: TrainConfig) -> float:
    """Linear warm-up from 1% over `warmup_epochs`, then x decay_factor at each decay epoch."""
    if epoch_float < cfg.warmup_epochs:
        return 0.01 + 0.99 * epoch_float / cfg.warmup_epochs
    return cfg.decay_factor ** sum(epoch_float >= e for e in cfg.decay_epochs)


class DistributedContext:
    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        if torch.cuda.is_available():
            self.device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(self.local_rank)
        else:
            self.device = "cpu"
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.startswith("cuda") else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = True) -> dict:
    """Train, checkpoint every epoch to `run_dir/last.pt`, log to `run_dir/log.jsonl`.
    Returns the final evaluation (per eval dataset)."""
    run_dir = Path(run_dir)
    ctx = DistributedContext()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    train_sets = [load_dataset(name, cfg.split) for name in cfg.train_data]
    samples, label_names = combine_for_training(train_sets)
    model = ReIDModel(cfg.backbone, len(label_names), cfg.pretrained, cfg.last_stride,
                      cfg.embedding_dim).to(ctx.device)
    spec = cfg.input_spec(model.backbone)

    ce = CrossEntropyLabelSmooth(len(label_names), cfg.label_smoothing)
    triplet = BatchHardTripletLoss(cfg.triplet_margin)
    center = CenterLoss(len(label_names), model.embedding_dim).to(ctx.device)
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    optimizer = torch.optim.Adam([
        {"params": model.backbone.parameters(), "lr_scale": cfg.backbone_lr_factor},
        {"params": head, "lr_scale": 1.0},
    ], lr=cfg.lr, weight_decay=cfg.weight_decay)
    center_optimizer = torch.optim.SGD(center.parameters(), lr=cfg.center_lr)

    start_epoch = 0
    checkpoint_path = run_dir / "last.pt"
    if resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=ctx.device, weights_only=False)
        model.load_state_dict(state["model"])
        center.load_state_dict(state["center"])
        optimizer.load_state_dict(state["optimizer"])
        center_optimizer.load_state_dict(state["center_optimizer"])
        start_epoch = state["epoch"]
        if ctx.is_main:
            print(f"resumed from {checkpoint_path} at epoch {start_epoch}")

    if ctx.is_main and start_epoch == 0:
        (run_dir / "log.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log

    def wrap(frozen: bool):
        """(Re)wrap for DDP whenever the set of trained parameters changes."""
        for param in model.backbone.parameters():
            param.requires_grad_(not frozen)
        return torch.nn.parallel.DistributedDataParallel(model) if ctx.enabled else model

    sampler = PKBatchSampler([s.pid for s in samples], cfg.p, cfg.k, cfg.seed, ctx.rank, ctx.world_size)
    data = ImageSamples(samples, TrainTransform(spec, seed=cfg.seed * 1000 + ctx.rank))
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=0)
    if ctx.is_main:
        print(f"training {cfg.backbone} on {len(samples)} images / {len(label_names)} ids: "
              + "; ".join(ds.describe() for ds in train_sets))

    evaluation: dict = {}
    net, net_frozen = None, None
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        frozen = epoch < cfg.freeze_backbone_epochs
        if frozen != net_frozen:
            net, net_frozen = wrap(frozen), frozen
        net.train()
        if frozen:
            model.backbone.eval()  # keep the pretrained BN statistics while only the head learns
        batches = len(sampler) if not cfg.max_batches_per_epoch else min(len(sampler), cfg.max_batches_per_epoch)
        totals = {"loss": 0.0, "id": 0.0, "triplet": 0.0, "center": 0.0, "acc": 0.0}
        started = time.time()
        bar = tqdm(loader, total=batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not ctx.is_main)
        for step, (images, labels, _cams) in enumerate(bar):
            if step >= batches:
                break
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * group["lr_scale"] * learning_rate_factor(epoch + step / batches, cfg)
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            features, logits = net(images)
            id_loss, tri_loss = ce(logits, labels), triplet(features, labels)
            center_loss = center(features, labels)
            loss = id_loss + tri_loss + cfg.center_weight * center_loss
            optimizer.zero_grad()
            center_optimizer.zero_grad()
            loss.backward()
            if ctx.enabled:  # center parameters live outside DDP: average their gradient by hand
                dist.all_reduce(center.centers.grad)
                center.centers.grad /= ctx.world_size
            center.centers.grad *= 1.0 / cfg.center_weight  # centre update independent of the loss weight
            optimizer.step()
            center_optimizer.step()
            acc = (logits.argmax(1) == labels).float().mean().item()
            for key, value in (("loss", loss.item()), ("id", id_loss.item()), ("triplet", tri_loss.item()),
                               ("center", center_loss.item()), ("acc", acc)):
                totals[key] += value
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}", lr=f"{optimizer.param_groups[-1]['lr']:.1e}")
        record = {k: ctx.mean(v / max(1, batches)) for k, v in totals.items()}
        record.update(epoch=epoch + 1, seconds=round(time.time() - started, 1),
                      images_per_second=round(batches * cfg.p * cfg.k / (time.time() - started), 2))
        last = epoch + 1 == cfg.epochs
        if ctx.is_main and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            evaluation = evaluate_all(model, cfg, spec, ctx.device)
            record["eval"] = evaluation
        if ctx.is_main:
            print(json.dumps({k: v for k, v in record.items() if k != "eval"}))
            for name, metrics in record.get("eval", {}).items():
                print(f"  {name}: mAP {100 * metrics['mAP']:.1f} rank-1 {100 * metrics['ranks']['rank1']:.1f}")
            with open(run_dir / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            save_checkpoint(checkpoint_path, model, center, optimizer, center_optimizer, epoch + 1, cfg, spec, label_names)
    ctx.close()
    return evaluation


def evaluate_all(model, cfg: TrainConfig, spec: InputSpec, device: str) -> dict:
    results = {}
    for name in cfg.eval_data:
        dataset: ReIDDataset = load_dataset(name, cfg.split)
        results[dataset.name] = evaluate_model(model, dataset, spec, device).as_dict()
    return results


def save_checkpoint(path: Path, model, center, optimizer, center_optimizer, epoch, cfg, spec, label_names):
    tmp = path.with_suffix(".tmp")
    torch.save({
        "model": model.state_dict(), "center": center.state_dict(), "optimizer": optimizer.state_dict(),
        "center_optimizer": center_optimizer.state_dict(), "epoch": epoch, "config": asdict(cfg),
        "input": spec.card(), "num_classes": len(label_names), "label_names": label_names,
    }, tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves a broken checkpoint


def load_trained_model(checkpoint: str | Path, device: str = "cpu") -> tuple[ReIDModel, InputSpec, dict]:
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    cfg = state["config"]
    model = ReIDModel(cfg["backbone"], state["num_classes"], pretrained=False, last_stride=cfg["last_stride"],
                      embedding_dim=cfg.get("embedding_dim", 0))
    model.load_state_dict(state["model"])
    model.eval()
    inp = state["input"]
    spec = InputSpec(inp["height"], inp["width"], tuple(inp["mean"]), tuple(inp["std"]))
    return model, spec, state
