"""Supervised ReID training with the strong-baseline recipe (Luo et al. 2019): BNNeck, label-smoothed
cross-entropy + batch-hard triplet + center loss, Adam with linear warm-up and step decay, P x K batches.

Runs on one device or under `torchrun` (DistributedDataParallel; gloo on CPU, nccl on GPUs): every
process draws the same global batch list and trains on its own share of it."""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from index.files import atomic_write

from .data.batch_augment import Augmentation, BatchAugment, DecodedImages
from .data.datasets import ReIDDataset, Sample, combine_for_training, load_dataset
from .data.sampler import PKBatchSampler
from .data.transforms import InputSpec, load_rgb
from .features import evaluate_model
from .losses import BatchHardTripletLoss, CenterLoss, CrossEntropyLabelSmooth
from .reid_model import NormalizedEncoder, ReIDModel
from .trainer import Checkpoint, Evaluation, Hook, JsonlLog, Trainer, TrainerConfig, resume_state
from .weight_average import WeightAverage, reestimate_batchnorm

# Batches of training images on which an averaged model's BN statistics are re-estimated (3,200 images:
# the statistics settle well before that, and it costs well under a minute)
AVERAGE_BN_BATCHES = 100


@dataclass
class TrainConfig(TrainerConfig):
    train_data: list[str] = field(default_factory=lambda: ["cuhk03", "prid450s", "prid2011", "viper-all"])
    eval_data: list[str] = field(default_factory=lambda: ["cuhk03", "prid450s", "prid2011"])
    split: int = 0
    backbone: str = "efficientnet_lite0"
    pretrained: str | bool = True
    last_stride: int = 1  # the ReID convention: the last stage keeps its resolution
    pooling: str = "avg"  # or "gem" (generalized mean)
    frozen_stages: int = 0  # stem + this many backbone stages kept at ImageNet weights (faster, see ReIDModel)
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
    eval_every: int = 4
    # 0 = full epochs; otherwise this many batches per epoch, with more than one pass over the data if it
    # takes more (the lever study's equal budgets) or part of one (quick smoke runs)
    max_batches_per_epoch: int = 0
    random_erasing: float = 0.5  # probability per image
    color_jitter: float = 0.0  # brightness / contrast / saturation strength (0 = off)
    flip_average: bool = False  # embed image + mirror image (evaluation and the exported encoder; 2x cost)
    # Warm restart: start from a checkpoint's weights (`last.pt`, or a bundle's `weights.pt`) with a fresh
    # optimiser and schedule. The classifier is kept when the identities are the same, else trained anew.
    init: str = ""
    # Weight averaging (SWA): the epoch-end weights from this (1-based) epoch to the last are averaged, and
    # the average, with BN statistics re-estimated, is saved as `averaged.pt`, evaluated and returned as the
    # run's result (`last.pt` stays the last epoch's). 0 = off. Meant for a constant learning rate.
    average_from: int = 0

    def input_spec(self, backbone_module) -> InputSpec:
        return InputSpec(self.height, self.width, tuple(backbone_module.input_mean), tuple(backbone_module.input_std))


class ImageSamples(torch.utils.data.Dataset):
    """Decoded images kept in memory (the shared sets are small), augmented per sample with PIL (GRACL)."""

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


def epoch_batches(sampler: PKBatchSampler, epoch: int, count: int):
    """`count` batches for `epoch`: the epoch's own pass over the data, then further freshly drawn passes
    if `count` is longer than one."""
    extra = 0
    while True:
        sampler.set_epoch(epoch + 100_003 * extra)
        for batch in sampler:
            if count <= 0:
                return
            count -= 1
            yield batch
        extra += 1


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


def warm_start(model: ReIDModel, center: CenterLoss, init: str | Path, label_names: list[str]) -> list[dict]:
    """Load another run's weights into a fresh model; returns that run's lineage (its training cycles).
    The classifier and the class centres carry over only when they are about the same identities."""
    if not Path(init).is_file():
        raise FileNotFoundError(f"--init {init}: no such checkpoint file")
    state = torch.load(init, map_location="cpu", weights_only=False)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
    same_ids = state.get("label_names") == label_names
    if not same_ids:
        weights = {k: v for k, v in weights.items() if not k.startswith("classifier.")}
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # tensors of other shapes
        raise ValueError(f"--init {init} does not fit this model: {str(e)[:500]}") from None
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise ValueError(f"--init {init} does not fit this model: missing {missing}, unexpected {unexpected}")
    if same_ids and "center" in state:
        center.load_state_dict(state["center"])
    return list(state.get("lineage") or [legacy_cycle(state)])


def legacy_cycle(state: dict) -> dict:
    """The one cycle a checkpoint from before lineage records describes (its minutes were not kept)."""
    return cycle_record(state.get("config", {}), state.get("epoch"), None)


def cycle_record(cfg: dict, epochs_done: int | None, seconds: float | None) -> dict:
    """One lineage entry: where a training cycle started, on what, for how long."""
    return {"init": cfg.get("init") or ("imagenet" if cfg.get("pretrained") else "scratch"),
            "data": cfg.get("train_data"), "split": cfg.get("split"), "backbone": cfg.get("backbone"),
            "epochs": epochs_done, "input": [cfg.get("height"), cfg.get("width")],
            "minutes": None if seconds is None else round(seconds / 60, 1),
            **({"averaged_from": cfg["average_from"]} if cfg.get("average_from") else {})}


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = True) -> dict:
    """Train, checkpoint every epoch to `run_dir/last.pt`, log to `run_dir/log.jsonl`.
    Returns the final evaluation (per eval dataset)."""
    trainer = SupervisedTrainer(cfg, Path(run_dir), resume)
    evaluation = trainer.train()
    trainer.ctx.close()
    return evaluation


class SupervisedTrainer(Trainer):
    """P x K batches, the warm-up and step schedule set every step, the backbone frozen for the first
    `freeze_backbone_epochs`; under torchrun, DDP, with only the main process evaluating, logging and saving."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool):
        self.ctx = ctx = DistributedContext()
        cfg.start_torch()
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

        train_sets = [load_dataset(name, cfg.split) for name in cfg.train_data]
        samples, self.label_names = combine_for_training(train_sets)
        num_classes = len(self.label_names)
        model = ReIDModel(cfg.backbone, num_classes, cfg.pretrained and not cfg.init, cfg.last_stride,
                          cfg.embedding_dim, cfg.pooling)
        self.spec = cfg.input_spec(model.backbone)
        self.ce = CrossEntropyLabelSmooth(num_classes, cfg.label_smoothing)
        self.triplet = BatchHardTripletLoss(cfg.triplet_margin)
        center = CenterLoss(num_classes, model.embedding_dim)
        self.parent_lineage: list[dict] = warm_start(model, center, cfg.init, self.label_names) if cfg.init else []
        model.freeze_front(cfg.frozen_stages)
        # channels_last: training steps run 1.6x faster on CPU in NHWC (oneDNN; docs/train-speed.md)
        self.model = model = model.to(ctx.device, memory_format=torch.channels_last)
        self.center = center = center.to(ctx.device)
        head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
        self.optimizer = torch.optim.Adam([
            {"params": model.backbone.parameters(), "lr_scale": cfg.backbone_lr_factor},
            {"params": head, "lr_scale": 1.0},
        ], lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.center_optimizer = torch.optim.SGD(center.parameters(), lr=cfg.center_lr)

        start_epoch, self.train_seconds = 0, 0.0
        self.average = WeightAverage() if cfg.average_from else None
        checkpoint_path = run_dir / "last.pt"
        state = resume_state(checkpoint_path, resume, map_location=ctx.device)
        if state is not None:
            model.load_state_dict(state["model"])
            center.load_state_dict(state["center"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.center_optimizer.load_state_dict(state["center_optimizer"])
            start_epoch, self.train_seconds = state["epoch"], state.get("train_seconds", 0.0)
            self.parent_lineage = state.get("lineage", [])[:-1]
            if self.average is not None and state.get("average"):
                self.average.load_state_dict(state["average"])
            if ctx.is_main:
                print(f"resumed from {checkpoint_path} at epoch {start_epoch}")

        self.sampler = PKBatchSampler([s.pid for s in samples], cfg.p, cfg.k, cfg.seed, ctx.rank, ctx.world_size)
        self.images = DecodedImages(samples, cfg.height, cfg.width, progress=ctx.is_main)
        augmentation = Augmentation(erase_p=cfg.random_erasing, color_jitter=cfg.color_jitter)
        self.augment = BatchAugment(self.spec, augmentation, seed=cfg.seed * 1000 + ctx.rank)
        if ctx.is_main:
            print(f"training {cfg.backbone} on {len(samples)} images / {num_classes} ids: "
                  + "; ".join(ds.describe() for ds in train_sets))
        self.batches = cfg.max_batches_per_epoch or len(self.sampler)
        self.net, self.net_frozen = None, None
        hooks = [Evaluation(lambda: evaluate_all(model, cfg, self.spec, ctx.device)),
                 JsonlLog(run_dir / "log.jsonl", describe_evaluation),
                 *([Averaging(run_dir)] if self.average is not None else []),
                 Checkpoint(checkpoint_path)] if ctx.is_main else []
        super().__init__(cfg, start_epoch, hooks, show_progress=ctx.is_main)

    def run_epoch(self) -> dict:
        cfg, ctx, epoch = self.cfg, self.ctx, self.epoch
        self.augment.generator.manual_seed(cfg.seed * 1000 + ctx.rank + 7919 * epoch)  # resumable draws
        frozen = epoch < cfg.freeze_backbone_epochs
        if frozen != self.net_frozen:  # (re)wrap for DDP whenever the set of trained parameters changes
            self.model.set_backbone_trainable(not frozen)
            self.net = torch.nn.parallel.DistributedDataParallel(self.model) if ctx.enabled else self.model
            self.net_frozen = frozen
        self.net.train()
        if frozen:
            self.model.backbone.eval()  # keep the pretrained BN statistics while only the head learns
        started = time.time()
        means = self.run_steps(epoch_batches(self.sampler, epoch, self.batches), self.batches,
                               f"epoch {epoch + 1}/{cfg.epochs}")
        epoch_seconds = time.time() - started
        self.train_seconds += epoch_seconds
        record = {k: ctx.mean(v) for k, v in means.items()}
        record.update(epoch=epoch + 1, seconds=round(epoch_seconds, 1),
                      images_per_second=round(self.batches * cfg.p * cfg.k / epoch_seconds, 2))
        return record

    def run_step(self, indices) -> dict[str, float]:
        cfg = self.cfg
        factor = learning_rate_factor(self.epoch + self.step / self.batches, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * factor
        batch = self.augment(self.images.images[indices]).to(self.ctx.device)
        labels = self.images.labels[indices].to(self.ctx.device)
        return training_step(self.net, batch, labels, self.ce, self.triplet, self.center, cfg, self.ctx,
                             self.optimizer, self.center_optimizer)

    def progress(self, losses: dict[str, float]) -> dict[str, str]:
        return {**super().progress(losses), "lr": f"{self.optimizer.param_groups[-1]['lr']:.1e}"}

    def state_dict(self) -> dict:
        lineage = self.parent_lineage + [cycle_record(asdict(self.cfg), self.epoch + 1, self.train_seconds)]
        state = {"model": self.model.state_dict(), "center": self.center.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "center_optimizer": self.center_optimizer.state_dict(),
                 "epoch": self.epoch + 1, "config": asdict(self.cfg), "input": self.spec.card(),
                 "num_classes": len(self.label_names), "label_names": self.label_names,
                 "lineage": lineage, "train_seconds": self.train_seconds}
        if self.average is not None:
            state["average"] = self.average.state_dict()
        return state

    def averaged_model(self) -> ReIDModel:
        """A copy of the model with the averaged weights and BN statistics re-estimated on training batches."""
        model = copy.deepcopy(self.model)
        self.average.copy_into(model)
        self.augment.generator.manual_seed(self.cfg.seed * 1000 + 7919 * self.cfg.epochs)
        batches = (self.augment(self.images.images[indices]).to(self.ctx.device)
                   for indices in epoch_batches(self.sampler, self.cfg.epochs, AVERAGE_BN_BATCHES))
        reestimate_batchnorm(model, batches, AVERAGE_BN_BATCHES)
        return model


class Averaging(Hook):
    """Adds every epoch's weights from `average_from` on to the trainer's average (before `Checkpoint`
    saves it, so a resumed run keeps it); after the last epoch saves the averaged model as `averaged.pt`
    (a checkpoint like `last.pt`: it exports and warm-starts alike), evaluates it and logs the evaluation."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def after_epoch(self) -> None:
        t = self.trainer
        if t.epoch + 1 >= t.cfg.average_from:
            t.average.update(t.model)

    def after_train(self) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        if t.average.count == 0 or (t.start_epoch >= cfg.epochs and (self.run_dir / "averaged.pt").exists()):
            return  # nothing averaged, or a finished run started again
        t.epoch = cfg.epochs - 1  # the last epoch's state, also when a resumed run had no epoch left to train
        model = t.averaged_model()
        epochs = [cfg.epochs - t.average.count + 1, cfg.epochs]
        state = t.state_dict()
        state.pop("average")
        state["model"] = model.state_dict()
        # the lineage tells these weights from the run's last epoch (whose entry has `averaged_from` alone)
        state["lineage"][-1]["averaged_epochs"] = epochs
        with atomic_write(self.run_dir / "averaged.pt") as tmp:
            torch.save(state, tmp)
        record = {"averaged_epochs": epochs, "eval": evaluate_all(model, cfg, t.spec, t.ctx.device)}
        t.evaluation = record["eval"]
        print(json.dumps({"averaged_epochs": record["averaged_epochs"], "saved": str(self.run_dir / "averaged.pt")}))
        for line in describe_evaluation(record["eval"]):
            print(line)
        with open(self.run_dir / "log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")


def describe_evaluation(evaluation: dict) -> list[str]:
    """The console lines of an evaluation: mAP and rank-1 per dataset."""
    return [f"  {name}: mAP {100 * m['mAP']:.1f} rank-1 {100 * m['ranks']['rank1']:.1f}"
            for name, m in evaluation.items()]


def training_step(net, images, labels, ce, triplet, center, cfg: TrainConfig, ctx: DistributedContext,
                  optimizer, center_optimizer) -> dict[str, float]:
    """One step of ID + triplet + center loss; returns the batch's losses and identity accuracy."""
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
    return {"loss": loss.item(), "id": id_loss.item(), "triplet": tri_loss.item(), "center": center_loss.item(),
            "acc": (logits.argmax(1) == labels).float().mean().item()}


def evaluate_all(model, cfg: TrainConfig, spec: InputSpec, device: str) -> dict:
    encoder = NormalizedEncoder(model, flip_average=cfg.flip_average)
    results = {}
    for name in cfg.eval_data:
        dataset: ReIDDataset = load_dataset(name, cfg.split)
        results[dataset.name] = evaluate_model(encoder, dataset, spec, device).as_dict()
    return results


def load_trained_model(checkpoint: str | Path, device: str = "cpu") -> tuple[ReIDModel, InputSpec, dict]:
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    cfg = state["config"]
    model = ReIDModel(cfg["backbone"], state["num_classes"], pretrained=False, last_stride=cfg["last_stride"],
                      embedding_dim=cfg.get("embedding_dim", 0), pooling=cfg.get("pooling", "avg"))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()})
    model.eval()
    inp = state["input"]
    spec = InputSpec(inp["height"], inp["width"], tuple(inp["mean"]), tuple(inp["std"]))
    return model, spec, state
