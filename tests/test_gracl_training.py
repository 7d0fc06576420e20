"""GRACL trainer end to end on synthetic data: `reid train --method gracl` from a supervised encoder, with
per-epoch cluster statistics against the (unused for training) labels, and a checkpoint that exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from models.synthetic import make_synthetic
from models.train import load_trained_model

ROOT = Path(__file__).resolve().parents[1]


def reid(*args: str):
    proc = subprocess.run([sys.executable, "-m", "scripts.cli", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_gracl_method_adapts_an_encoder_and_logs_cluster_statistics(tmp_path):
    data = tmp_path / "data"
    make_synthetic(data, n_train_ids=30, n_test_ids=15, seed=0)
    reid("train", "--data", str(data), "--eval-data", str(data), "--run-dir", str(tmp_path / "sup"), "--backbone",
         "resnet18", "--pretrained", "false", "--height", "64", "--width", "32", "--embedding-dim", "32",
         "--epochs", "3", "--threads", "2", "--freeze-backbone-epochs", "0", "--lr", "1e-3")
    run = tmp_path / "gracl"
    reid("train", "--method", "gracl", "--encoder", str(tmp_path / "sup" / "last.pt"), "--data", str(data),
         "--eval-data", str(data), "--run-dir", str(run), "--epochs", "2", "--batches-per-epoch", "4",
         "--p", "4", "--k", "4", "--eps", "0.45", "--threads", "2", "--eval-every", "1")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    for record in log:
        stats = record["clusters"]
        assert {"clusters", "outlier_share", "nmi", "ari", "pairwise_precision"} <= set(stats)
        assert "loss" in record or "skipped" in record
        assert "/tmp" in next(iter(record["eval"])) or record["eval"]
    assert any("inter" in r and "intra" in r for r in log), "at least one epoch trained on both proxy losses"
    model, spec, state = load_trained_model(run / "last.pt")  # the checkpoint exports like a supervised one
    assert state["method"] == "gracl" and model.embedding_dim == 32


def test_every_gracl_flag_reaches_the_config():
    from scripts.cli import build_parser, gracl_train_config

    args = build_parser().parse_args(["train", "--method", "gracl", "--data", "viper", "--freeze-bn", "--intra-loss",
                                      "pull", "--k1", "10", "--w-centroid", "1", "--inter-rule", "knn_mean"])
    cfg = gracl_train_config(args)
    assert (cfg.freeze_bn, cfg.intra_loss, cfg.k1, cfg.w_centroid, cfg.inter_rule) == (True, "pull", 10, 1.0, "knn_mean")
    default = gracl_train_config(build_parser().parse_args(["train", "--method", "gracl"]))
    assert default.freeze_bn is False and default.intra_loss == "infonce"
