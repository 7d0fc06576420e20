"""NFormer stage 2 end to end on synthetic data: `reid train --method nformer` (stage 1 then stage 2),
resume, export with `nformer.onnx`, and the exported graph refining like the trained torch module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from index.bundle import load_bundle
from index.refine import NeighborTransformer, NFormerSpec
from models.nformer_train import (NFormerTrainConfig, draw_sequence, draw_served_sequence, draw_step,
                                  keep_one_of_some,
                                  load_trained_nformer, torch_refiner_function)
from models.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]


def reid(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "scripts.cli", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_draw_sequence_takes_a_neighbourhood_of_the_anchor():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((1000, 8)).astype(np.float32)
    seq = draw_sequence(bank, 100, rng)
    assert len(seq) == len(set(seq)) == 100
    assert len(draw_sequence(bank[:50], 100, rng)) == 50  # a bank smaller than the sequence: all of it


def test_served_sequences_are_an_anchor_and_its_nearest_candidates():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((500, 8)).astype(np.float32)
    seq = draw_served_sequence(bank, 40, rng)
    anchor, rest = seq[0], seq[1:]
    scores = bank @ bank[anchor]
    assert len(seq) == len(set(seq)) == 41 and anchor not in rest
    assert list(rest) == [i for i in np.argsort(-scores) if i != anchor][:40]  # the 40 nearest, nearest first
    cfg = NFormerTrainConfig(sequence_length=100, served_candidates=40, sequences_per_step=400, served_share=0.25)
    lengths = [len(s) for s in draw_step(bank, cfg, rng)]
    assert set(lengths) == {41, 100} and 0.15 < lengths.count(41) / 400 < 0.35


def test_singleton_share_cuts_identities_to_one_image_and_keeps_the_served_anchor():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(100), 5)  # 100 identities x 5 images
    seq = rng.permutation(500)
    assert (keep_one_of_some(seq, labels, 0.0, rng) == seq).all()
    cut = keep_one_of_some(seq, labels, 0.5, rng)
    per_id = np.bincount(labels[cut], minlength=100)
    assert set(per_id) == {1, 5} and 30 < (per_id == 1).sum() < 70  # each identity whole or cut to one image
    order = {v: i for i, v in enumerate(seq)}
    assert all(order[a] < order[b] for a, b in zip(cut, cut[1:]))  # order kept
    assert len(keep_one_of_some(seq, labels, 1.0, rng)) == 100

    bank = rng.standard_normal((500, 8)).astype(np.float32)
    cfg = NFormerTrainConfig(served_share=1.0, served_candidates=60, sequences_per_step=50, singleton_share=1.0)
    for s in draw_step(bank, cfg, rng, labels):
        assert np.bincount(labels[s]).max() == 1  # every identity lone, the anchor's too
        scores = bank[s[1:]] @ bank[s[0]]
        assert (np.diff(scores) <= 0).all()  # still the query first, then its candidates nearest first
    cfg.singleton_share = 0.0
    assert any(np.bincount(labels[s]).max() > 1 for s in draw_step(bank, cfg, rng, labels))


def test_nformer_method_trains_both_stages_resumes_and_exports(tmp_path):
    data = tmp_path / "data"
    make_synthetic(data, n_train_ids=24, n_test_ids=12, cameras=3, images_per_id_per_cam=2, seed=5)
    run = tmp_path / "run"
    common = ["--data", str(data), "--eval-data", str(data), "--run-dir", str(run), "--threads", "2",
              "--nformer-epochs", "2", "--sequence-length", "96", "--steps-per-epoch", "6", "--nformer-lr", "1e-3",
              "--served-share", "0.5", "--served-candidates", "30"]
    reid("train", "--method", "nformer", "--backbone", "resnet18", "--pretrained", "false", "--height", "64",
         "--width", "32", "--embedding-dim", "32", "--epochs", "1", "--max-batches-per-epoch", "6", *common)
    log = [json.loads(line) for line in (run / "nformer_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[-1]["loss"] < log[0]["loss"], "stage 2 learns"
    evaluation = log[-1]["eval"]["market:data"]
    assert set(evaluation) == {"none", "joint", "local"} and evaluation["joint"] != evaluation["none"]

    before = (run / "nformer.pt").stat().st_mtime_ns
    reid("train", "--method", "nformer", "--encoder", str(run / "last.pt"), *common)  # already done: resumes
    assert (run / "nformer.pt").stat().st_mtime_ns == before

    reid("export", "--checkpoint", str(run / "last.pt"), "--nformer", str(run / "nformer.pt"),
         "--out", str(tmp_path / "bundle"), "--check-data", str(data), "--name", "tiny-nformer")
    bundle = load_bundle(tmp_path / "bundle")  # the service's loader verifies every sha256
    card = bundle.card
    assert set(card["files"]) == {"encoder.onnx", "nformer.onnx", "nformer.int8.onnx", "weights.pt"}
    assert min(c["min_cosine"] for c in card["nformer"]["int8"]["check"].values()) >= 0.999
    assert card["nformer"]["dim"] == card["embedding_dim"] == 32
    assert card["nformer"]["stage2"]["input_norm"] == "l2"
    assert max(v for k, v in card["nformer"]["export_check"].items() if k.endswith("diff")) < 1e-4

    nformer = load_trained_nformer(run / "nformer.pt")
    onnx = NeighborTransformer(bundle.file("nformer.onnx"), NFormerSpec.from_card(card["nformer"]), threads=1)
    x = torch.nn.functional.normalize(torch.randn(40, 32), dim=1).numpy()
    np.testing.assert_allclose(onnx(x), torch_refiner_function(nformer)(x), rtol=1e-4, atol=1e-5)
