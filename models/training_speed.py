"""Training throughput (forward + backward + optimiser step, images/s) of one configuration on real images:
the figure every training budget in this project is planned with.

Two input pipelines are measured side by side: `pil`, per-sample PIL augmentation through a DataLoader in
NCHW (the trainer before issue 14), and `tensor`, the decoded set in memory with per-batch augmentation in
torch (`models.data.batch_augment`), each with and without `channels_last`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .data.batch_augment import Augmentation, BatchAugment, DecodedImages
from .data.datasets import combine_for_training, load_dataset
from .data.sampler import PKBatchSampler
from .data.transforms import TrainTransform
from .losses import BatchHardTripletLoss, CenterLoss, CrossEntropyLabelSmooth
from .reid_model import ReIDModel
from .train import DistributedContext, ImageSamples, TrainConfig, training_step


@dataclass(frozen=True)
class SpeedCase:
    backbone: str = "efficientnet_lite0"
    height: int = 128
    width: int = 64
    pipeline: str = "tensor"  # or "pil"
    channels_last: bool = True
    pooling: str = "avg"
    frozen_stages: int = 0

    def label(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        frozen = f", stem + {self.frozen_stages} stages frozen" if self.frozen_stages else ""
        return f"{self.backbone} {self.height}x{self.width}, {self.pipeline} pipeline, {layout}, {self.pooling} pool{frozen}"


def _batches(case: SpeedCase, samples, cfg: TrainConfig, spec):
    """An endless stream of (images, labels) batches from the case's pipeline."""
    sampler = PKBatchSampler([s.pid for s in samples], cfg.p, cfg.k, seed=0)
    if case.pipeline == "pil":
        data = ImageSamples(samples, TrainTransform(spec, seed=0))
        for i in range(len(data)):  # decoded once, as the old trainer cached them after the first epoch
            data[i]
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=0)
        while True:
            for images, labels, _ in loader:
                yield (images.contiguous(memory_format=torch.channels_last) if case.channels_last else images), labels
    else:
        decoded = DecodedImages(samples, case.height, case.width, progress=False)
        augment = BatchAugment(spec, Augmentation(), seed=0)
        while True:
            for indices in sampler:
                images = augment(decoded.images[indices])
                yield (images if case.channels_last else images.contiguous()), decoded.labels[indices]


def training_throughput(case: SpeedCase, seconds: float = 30.0, warmup_steps: int = 3, images: int = 768,
                        threads: int = 2) -> dict:
    """Images/s of full training steps (P=8 x K=4) on the first `images` of CUHK03's split-0 training part."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = TrainConfig(backbone=case.backbone, height=case.height, width=case.width, pooling=case.pooling)
    samples, _ = combine_for_training([load_dataset("cuhk03", 0)])
    samples = samples[:images]
    label_count = max(s.pid for s in samples) + 1
    model = ReIDModel(case.backbone, label_count, True, cfg.last_stride, cfg.embedding_dim, case.pooling)
    model.freeze_front(case.frozen_stages)
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    spec = cfg.input_spec(model.backbone)
    ce, triplet = CrossEntropyLabelSmooth(label_count, cfg.label_smoothing), BatchHardTripletLoss(cfg.triplet_margin)
    center = CenterLoss(label_count, model.embedding_dim)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    center_optimizer = torch.optim.SGD(center.parameters(), lr=cfg.center_lr)
    ctx = DistributedContext()
    stream = _batches(case, samples, cfg, spec)

    def step():
        batch, batch_labels = next(stream)
        training_step(model, batch, batch_labels, ce, triplet, center, cfg, ctx, optimizer, center_optimizer)
        return len(batch_labels)

    for _ in range(warmup_steps):
        step()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        done += step()
    elapsed = time.perf_counter() - started
    return {"case": case.label(), "images_per_second": round(done / elapsed, 1), "images": done,
            "seconds": round(elapsed, 1), "threads": threads}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| configuration | training img/s |", "|---|---|"]
    lines += [f"| {r['case']} | {r['images_per_second']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"
