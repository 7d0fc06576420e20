"""Adapt a deployed bundle to new cameras without labels (`reid adapt`): GRACL fine-tunes the bundle's
encoder on unlabeled images, NFormer stage 2 is re-run on the final pseudo-labels when the parent has an
NFormer, and a new, checked bundle is exported whose card records its parent and the adaptation data.

The parent must carry `weights.pt` (its encoder's torch weights; `reid export` writes it by default): ONNX
holds BatchNorm folded into the convolutions, which cannot be fine-tuned faithfully."""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np

from index.bundle import WEIGHTS_FILE, read_card, sha256_file

from .data.datasets import Sample
from .export import export_bundle
from .gracl.pseudo_labels import cluster_stats
from .gracl.train import GRACLConfig, cluster_training_set, train_gracl, training_samples
from .nformer_train import NFormerTrainConfig, train_nformer
from .train import load_trained_model

# share of the progress bar each stage takes (GRACL dominates the time)
STAGES = {"gracl": (0.0, 0.8), "nformer": (0.8, 0.95), "export": (0.95, 1.0)}

Progress = Callable[[str, float, str], None]


# Pseudo-label settings chosen by NMI on CUHK03 split 1 (multi-shot: ~5 images per person per camera) with a
# source that never saw CUHK03 (docs/gracl-cuhk03-clusters.md). cluster-contrast's own (k1 30, k2 6, eps 0.6,
# min_samples 4) merged strangers there: 4.5% pair precision, a 216-image cluster.
ADAPTATION_CLUSTERING = {"k1": 6, "k2": 2, "eps": 0.45, "min_samples": 2}


def adaptation_recipe(**overrides) -> GRACLConfig:
    """GRACL for fine-tuning a trained encoder rather than training from ImageNet: the source's BatchNorm
    statistics kept and a 10x lower learning rate, no decay. Measured on VIPeR split 1 from a PRID-only model
    (docs/gracl-viper.md), and again on CUHK03 split 1 from a PRID + VIPeR model: relearning BN statistics or
    lr 3.5e-4 made both GRACL and cluster-contrast worse than no adaptation. Batches of 32 pseudo-identities x 4
    images: the clusters hold 2-9 images."""
    return replace(GRACLConfig(), **{"freeze_bn": True, "lr": 3.5e-5, "decay_epochs": [], "eval_data": [],
                                     "p": 32, "k": 4, **ADAPTATION_CLUSTERING, **overrides})


class AdaptationError(ValueError):
    """The bundle or the images cannot be adapted (no weights, too few images, ...)."""


def read_parent(bundle_dir: Path) -> dict:
    weights = bundle_dir / WEIGHTS_FILE
    # only the weights are read here, so only their hash is checked (and their absence is ours to report)
    card = read_card(bundle_dir, verify=False) if weights.exists() else {}
    if WEIGHTS_FILE not in card.get("files", {}):
        raise AdaptationError(f"bundle {bundle_dir} has no {WEIGHTS_FILE} (torch weights): re-export it with "
                              "`reid export`, which includes them by default")
    if sha256_file(weights) != card["files"][WEIGHTS_FILE]:
        raise AdaptationError(f"{weights}: sha256 does not match the card")
    return card


def images_digest(samples: list[Sample]) -> str:
    """Identifies the adaptation data: sha256 over the sorted sha256 of every image's bytes."""
    digests = sorted(hashlib.sha256(Path(s.path).read_bytes()).hexdigest() for s in samples)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def relabel_clustered(samples: list[Sample], labels: np.ndarray) -> list[Sample]:
    """Clustered images with their pseudo-label as identity (outliers dropped), labels already 0..C-1."""
    return [Sample(s.path, int(y), s.camid) for s, y in zip(samples, labels) if y >= 0]


def adapt_bundle(bundle_dir: str | Path, images: str | Path, out_dir: str | Path, gracl: GRACLConfig,
                 nformer_epochs: int = 4, nformer_steps: int = 50, name: str | None = None,
                 source: str | None = None, work_dir: str | Path | None = None, progress: Progress | None = None) -> dict:
    """Returns the new bundle's card. `gracl` carries the training recipe; its data and initial checkpoint
    are set here. `source` names the data in the card (default: the images path). A `work_dir` keeps the
    runs (and lets an interrupted adaptation resume); by default a temporary one is used and removed."""
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    report = progress or (lambda stage, fraction, message: None)
    if out_dir.exists():
        raise AdaptationError(f"{out_dir} exists: choose a new output directory")
    parent = read_parent(bundle_dir)
    cfg = replace(gracl, data=[str(images)], init_checkpoint=str(bundle_dir / WEIGHTS_FILE))
    samples = training_samples(cfg)
    if len(samples) < cfg.p * cfg.k:
        raise AdaptationError(f"{len(samples)} images: adaptation needs at least P x K = {cfg.p * cfg.k}")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="reid-adapt-") as scratch:
        work = Path(work_dir or scratch)

        def gracl_epoch(record: dict) -> None:
            lo, hi = STAGES["gracl"]
            c = record["clusters"]
            report("gracl", lo + (hi - lo) * record["epoch"] / record["epochs"],
                   f"epoch {record['epoch']}/{record['epochs']}: {c['clusters']} clusters, "
                   f"{100 * c['outlier_share']:.0f}% outliers" + (" (skipped)" if "skipped" in record else ""))

        report("gracl", 0.0, f"{len(samples)} images, {len({s.camid for s in samples})} cameras")
        train_gracl(cfg, work / "gracl", on_epoch=gracl_epoch)
        encoder_checkpoint = work / "gracl" / "last.pt"

        model, spec, _ = load_trained_model(encoder_checkpoint)
        _, labels = cluster_training_set(model, samples, spec, cfg, desc="final pseudo-labels")
        stats = cluster_stats(labels, cameras=np.array([s.camid for s in samples]))
        nformer_checkpoint, nformer_note = None, None
        if "nformer" in parent and nformer_epochs > 0:
            if stats.clusters >= 2:
                nformer_checkpoint = run_stage2(
                    encoder_checkpoint, work / "nformer", parent["nformer"], relabel_clustered(samples, labels),
                    nformer_epochs, nformer_steps, cfg, report)
            else:
                nformer_note = f"not retrained: {stats.clusters} pseudo-identities after adaptation"

        report("export", STAGES["export"][0], "exporting and checking the bundle")
        adaptation = {
            "method": "gracl",
            "source": source or str(images),
            "images": len(samples),
            "cameras": len({s.camid for s in samples}),
            "images_sha256": images_digest(samples),
            "final_clusters": stats.as_dict(),
            "recipe": {k: v for k, v in asdict(cfg).items() if k not in ("data", "init_checkpoint", "eval_data")},
            "nformer_epochs": nformer_epochs if nformer_checkpoint else 0,
            "seconds": round(time.time() - started, 1),
        }
        if nformer_note:
            adaptation["nformer"] = nformer_note
        card = export_bundle(
            encoder_checkpoint, out_dir, [s.path for s in samples[:8]], name=name or f"{parent['name']}-adapted",
            nformer_checkpoint=nformer_checkpoint,
            query_flip=bool(parent.get("query_flip", False)),  # queries are embedded as the parent's were
            extra_card={"parent": {"name": parent["name"], "version": parent["version"], "files": parent["files"]},
                        "adaptation": adaptation,
                        # the labeled data is the parent's; the adaptation images are unlabeled (source above)
                        "training_data": {**parent.get("training_data", {}), "adapted_on": adaptation["source"]}})
    report("export", 1.0, f"bundle {card['name']}:{card['version']} written to {out_dir}")
    return card


def run_stage2(encoder_checkpoint: Path, run_dir: Path, parent_nformer: dict, samples: list[Sample],
               epochs: int, steps: int, cfg: GRACLConfig, report: Progress) -> Path:
    """NFormer stage 2 with the parent's architecture, on pseudo-identities; returns `nformer.pt`."""
    ncfg = NFormerTrainConfig(
        epochs=epochs, steps_per_epoch=steps, heads=parent_nformer["heads"], layers=parent_nformer["layers"],
        topk=parent_nformer["topk"], landmarks=parent_nformer["landmarks"], dropout=parent_nformer["dropout"],
        eval_data=[], seed=cfg.seed, threads=cfg.threads, sequence_length=min(NFormerTrainConfig.sequence_length, len(samples)))
    lo, hi = STAGES["nformer"]

    def epoch_done(record: dict) -> None:
        report("nformer", lo + (hi - lo) * record["epoch"] / epochs, f"epoch {record['epoch']}/{epochs}")

    report("nformer", lo, f"NFormer stage 2 on {len(samples)} clustered images")
    train_nformer(encoder_checkpoint, run_dir, ncfg, samples=samples, on_epoch=epoch_done)
    return run_dir / "nformer.pt"
