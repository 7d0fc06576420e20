"""Unsupervised training with GRACL (spec `../shared/specs/GRACL.md`) on top of cluster-contrast: each
epoch, features of every unlabeled training image -> k-reciprocal Jaccard distance -> DBSCAN pseudo-labels
(outliers sit the epoch out) -> cluster memories (centroid, inter-ID and intra-ID relation-aware proxies)
-> camera-balanced P x K batches against those memories.

Labels in the training data are never used for training: only, where present, to report how good the
pseudo-labels are (NMI, ARI, pairwise precision) and to evaluate on a labeled protocol."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.datasets import Sample, load_dataset, unlabeled_folder
from ..data.batch_augment import Augmentation, BatchAugment, DecodedImages
from ..data.sampler import CameraBalancedSampler
from ..data.transforms import InputSpec
from ..features import evaluate_model, extract_decoded_features, extract_features
from ..reid_model import ReIDModel
from ..train import load_trained_model
from ..trainer import Checkpoint, EpochCallback, Evaluation, Hook, JsonlLog, Trainer, TrainerConfig, resume_state
from .memory import GRACLLoss
from .pseudo_labels import cluster_stats, pseudo_labels


@dataclass
class GRACLConfig(TrainerConfig):
    data: list[str] = field(default_factory=lambda: ["viper"])  # datasets or folders; labels ignored
    split: int = 0
    eval_data: list[str] = field(default_factory=list)
    init_checkpoint: str = ""  # start from a trained encoder (adaptation); empty = ImageNet backbone
    backbone: str = "efficientnet_lite0"
    pretrained: str | bool = True
    embedding_dim: int = 256
    height: int = 128
    width: int = 64
    epochs: int = 10
    batches_per_epoch: int = 50
    p: int = 16
    k: int = 4
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    decay_epochs: list[int] = field(default_factory=lambda: [8])
    # pseudo-labels (cluster-contrast's values)
    eps: float = 0.6
    min_samples: int = 4
    k1: int = 30
    k2: int = 6
    # memories and losses; w_centroid=1, w_inter=w_intra=0 is the cluster-contrast baseline
    tau: float = 0.05
    momentum: float = 0.1
    # GRACL's L_inter + L_intra at half weight each, the same total as cluster-contrast's one term. Under Adam
    # the scale of the whole loss barely matters (the step is normalised by the gradient's running RMS), so
    # 1 + 1 is not "twice the step": it differs from 0.5 + 0.5 only in how strongly weight decay, which Adam
    # adds to the gradient, pulls against the loss.
    w_centroid: float = 0.0
    w_inter: float = 0.5
    w_intra: float = 0.5
    inter_rule: str = "hardest_negative"
    intra_rule: str = "mean_similarity"
    inter_update: str = "outward"
    intra_update: str = "hard"
    intra_loss: str = "infonce"
    proxy_momentum: float | None = None  # the inter/intra memories' momentum; None = `momentum`
    inter_negatives: str = "proxies"  # or "centroids": L_inter contrasts against the other clusters' centroids
    cameras: list[int] = field(default_factory=list)  # adapt on these cameras' images only (empty = all)
    # adapt on the images of this many identities drawn at random (seed 0; 0 = all): a smaller deployment, for
    # experiments that must fit the machine. Labels choose the subset only; training never sees them.
    identities: int = 0
    # adaptation: keep BatchNorm running statistics of the source model (False: learn them anew, as cluster-contrast)
    freeze_bn: bool = False
    eval_every: int = 5


def unlabeled_images(spec: str, split: int = 0) -> list[Sample]:
    """A shared set's (or Market folder's) training part, or every image of a plain folder."""
    path = Path(spec)
    if path.is_dir() and not (path / "bounding_box_train").is_dir():
        return unlabeled_folder(path)
    return load_dataset(spec, split).train


def training_samples(cfg: GRACLConfig):
    """Every training image of the given sets; identities (-1 where unknown) kept only for pseudo-label
    statistics."""
    samples = []
    for name in cfg.data:
        offset = max((s.pid for s in samples), default=-1) + 1  # keep the sets' identities apart
        samples += [Sample(s.path, s.pid + offset if s.pid >= 0 else -1, s.camid)
                    for s in unlabeled_images(name, cfg.split) if not cfg.cameras or s.camid in cfg.cameras]
    if cfg.identities:
        known = sorted({s.pid for s in samples if s.pid >= 0})
        drawn = set(np.random.default_rng(0).permutation(known)[:cfg.identities].tolist())
        samples = [s for s in samples if s.pid in drawn]
    if not samples:
        cameras = f" (cameras {cfg.cameras})" if cfg.cameras else ""
        raise ValueError(f"no training images in {cfg.data}{cameras}")
    return samples


def cluster_training_set(model: ReIDModel, samples: list[Sample], spec: InputSpec, cfg: GRACLConfig,
                         desc: str = "features", decoded: DecodedImages | None = None) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised features of every image (test transform, eval mode) and their pseudo-labels; `decoded`
    (the samples already decoded at the input size) saves reading the files again."""
    if decoded is None:
        features = extract_features(model, samples, spec, desc=desc)
    else:
        features = extract_decoded_features(model, decoded.images, spec, desc=desc)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features, pseudo_labels(features, cfg.eps, cfg.min_samples, cfg.k1, cfg.k2)


def build_model(cfg: GRACLConfig) -> tuple[ReIDModel, InputSpec, dict]:
    """The encoder to train, its input spec, and the architecture fields a checkpoint needs to rebuild it."""
    if cfg.init_checkpoint:
        model, spec, state = load_trained_model(cfg.init_checkpoint)
        arch = {"backbone": state["config"]["backbone"], "last_stride": state["config"]["last_stride"],
                "embedding_dim": state["config"].get("embedding_dim", 0)}
    else:
        model = ReIDModel(cfg.backbone, 1, cfg.pretrained, embedding_dim=cfg.embedding_dim)
        spec = InputSpec(cfg.height, cfg.width, tuple(model.backbone.input_mean), tuple(model.backbone.input_std))
        arch = {"backbone": cfg.backbone, "last_stride": 1, "embedding_dim": cfg.embedding_dim}
    return model, spec, arch


def normalized_features(model: ReIDModel, images: torch.Tensor) -> torch.Tensor:
    """The training-mode embedding: post-BNNeck (batch statistics), L2-normalised, as cluster-contrast."""
    global_feature, _ = model(images)
    return F.normalize(model.bottleneck(global_feature), dim=1)


def train_gracl(cfg: GRACLConfig, run_dir: str | Path, resume: bool = True,
                on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train, checkpoint each epoch to `run_dir/last.pt`, log to `run_dir/log.jsonl`; `on_epoch` gets each
    epoch's log record (progress reporting)."""
    return GRACLTrainer(cfg, Path(run_dir), resume, on_epoch).train()


class GRACLTrainer(Trainer):
    """Each epoch: pseudo-labels from the current model's features, new cluster memories, then P x K
    camera-balanced steps against them (none when fewer than two clusters form)."""

    def __init__(self, cfg: GRACLConfig, run_dir: Path, resume: bool, on_epoch: Callable[[dict], None] | None):
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.start_torch()
        self.samples = samples = training_samples(cfg)
        true_ids = np.array([s.pid for s in samples])
        self.known_ids = true_ids if (true_ids >= 0).all() else None  # statistics only where every label is known
        self.cameras = [s.camid for s in samples]
        model, spec, self.arch = build_model(cfg)
        # channels_last: training steps run 1.6x faster on CPU in NHWC (oneDNN; docs/train-speed.md)
        self.model, self.spec = model.to(memory_format=torch.channels_last), spec
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        start_epoch, checkpoint_path = 0, run_dir / "last.pt"
        state = resume_state(checkpoint_path, resume)
        if state is not None:
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            start_epoch = state["epoch"]
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        # decoded once; each epoch's features and every batch's augmentation start from these tensors
        self.images = DecodedImages(samples, spec.height, spec.width)
        self.augment = BatchAugment(spec, Augmentation(), seed=cfg.seed)
        hooks: list[Hook] = []
        if cfg.eval_data:
            hooks.append(Evaluation(lambda: {name: evaluate_model(model, load_dataset(name, cfg.split), spec).as_dict()
                                             for name in cfg.eval_data}))
        hooks += [JsonlLog(run_dir / "log.jsonl"), Checkpoint(checkpoint_path)]
        if on_epoch:
            hooks.append(EpochCallback(on_epoch))
        super().__init__(cfg, start_epoch, hooks)

    def run_epoch(self) -> dict:
        cfg, epoch, model = self.cfg, self.epoch, self.model
        started = time.time()
        features, labels = cluster_training_set(model, self.samples, self.spec, cfg,
                                                f"features {epoch + 1}/{cfg.epochs}", self.images)
        record = {"epoch": epoch + 1, "epochs": cfg.epochs,
                  "clusters": cluster_stats(labels, self.known_ids, np.array(self.cameras)).as_dict()}
        num_clusters = int(labels.max()) + 1
        if num_clusters < 2:  # a contrast needs at least two pseudo-identities
            record["skipped"] = f"{num_clusters} clusters: no training this epoch"
        else:
            self.criterion = GRACLLoss.build(
                torch.from_numpy(features), torch.from_numpy(labels), num_clusters, w_centroid=cfg.w_centroid,
                w_inter=cfg.w_inter, w_intra=cfg.w_intra, inter_rule=cfg.inter_rule, intra_rule=cfg.intra_rule,
                inter_update=cfg.inter_update, intra_update=cfg.intra_update, intra_loss=cfg.intra_loss,
                tau=cfg.tau, momentum=cfg.momentum, proxy_momentum=cfg.proxy_momentum,
                inter_negatives=cfg.inter_negatives)
            self.pseudo = torch.from_numpy(labels).long()  # this epoch's pseudo-labels stand where identities would
            self.augment.generator.manual_seed(cfg.seed * 1000 + 7919 * epoch)  # resumable draws
            sampler = CameraBalancedSampler(labels, self.cameras, min(cfg.p, num_clusters), cfg.k,
                                            cfg.batches_per_epoch, cfg.seed * 1000 + epoch)
            lr = cfg.lr * 0.1 ** sum(epoch >= e for e in cfg.decay_epochs)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            model.train()
            if cfg.freeze_bn:  # keep the source's normalisation statistics (fine-tuning on small batches)
                for module in model.modules():
                    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                        module.eval()
            record.update(self.run_steps(sampler, len(sampler), f"gracl epoch {epoch + 1}/{cfg.epochs}"))
        record["seconds"] = round(time.time() - started, 1)
        return record

    def run_step(self, indices) -> dict[str, float]:
        images, y = self.augment(self.images.images[indices]), self.pseudo[indices]
        f = normalized_features(self.model, images)
        loss, parts = self.criterion(f, y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.criterion.update(f.detach(), y)
        return {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}

    def state_dict(self) -> dict:
        cfg = self.cfg
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch + 1,
                "config": {**asdict(cfg), **self.arch, "train_data": cfg.data},
                "input": self.spec.card(), "num_classes": self.model.classifier.out_features, "label_names": [],
                "method": "gracl"}
