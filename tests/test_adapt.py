"""`reid adapt`: the bundled model fine-tuned with GRACL on an unlabeled folder (one subfolder per camera)
becomes a new, verified bundle whose card names its parent and the exact adaptation data."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from index.bundle import load_bundle
from models.adapt import AdaptationError, adapt_bundle, images_digest
from models.data.datasets import unlabeled_folder
from models.gracl.train import GRACLConfig
from models.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
PARENT = ROOT / "service" / "default_bundle"


@pytest.fixture(scope="module")
def camera_folders(tmp_path_factory) -> Path:
    """Synthetic people, re-filed as a deployment would have them: `<camera>/<anything>.jpg`, no labels."""
    market = tmp_path_factory.mktemp("market")
    make_synthetic(market, n_train_ids=24, n_test_ids=2, cameras=2, images_per_id_per_cam=2, seed=3)
    out = tmp_path_factory.mktemp("unlabeled")
    for i, path in enumerate(sorted((market / "bounding_box_train").glob("*.jpg"))):
        camera = "entrance" if "_c1" in path.name else "lobby"
        (out / camera).mkdir(exist_ok=True)
        shutil.copy(path, out / camera / f"frame{i:05d}.jpg")
    return out


def test_unlabeled_folder_reads_cameras_from_subfolders(camera_folders):
    samples = unlabeled_folder(camera_folders)
    assert len(samples) == 24 * 2 * 2
    assert {s.pid for s in samples} == {-1}
    assert {s.camid for s in samples} == {1, 2}
    assert all(("entrance" in s.path) == (s.camid == 1) for s in samples)


def test_adapt_writes_a_verified_child_bundle(camera_folders, tmp_path):
    out = tmp_path / "adapted"
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "adapt", "--bundle", str(PARENT), "--images", str(camera_folders),
         "--out", str(out), "--epochs", "1", "--batches-per-epoch", "2", "--p", "4", "--k", "4", "--eps", "0.5",
         "--min-samples", "2", "--k1", "10", "--k2", "2", "--nformer-epochs", "1", "--nformer-steps", "2",
         "--threads", "2", "--lr", "1e-3", "--source", "gallery:test", "--progress-jsonl"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout carries nothing but events
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["fraction"] for e in progress] == sorted(e["fraction"] for e in progress)
    assert {e["stage"] for e in progress} == {"gracl", "nformer", "export"}
    assert events[-1]["event"] == "done" and events[-1]["bundle"] == str(out)

    parent, child = load_bundle(PARENT), load_bundle(out)  # the service accepts it: every hash verified
    card = child.card
    assert card["parent"] == {"name": parent.card["name"], "version": parent.card["version"],
                              "files": parent.card["files"]}
    adaptation = card["adaptation"]
    assert adaptation["source"] == "gallery:test" and adaptation["images"] == 96 and adaptation["cameras"] == 2
    assert card["training_data"] == {**parent.card["training_data"], "adapted_on": "gallery:test"}
    assert child.query_flip == parent.query_flip  # queries are embedded as the parent's were
    assert adaptation["images_sha256"] == images_digest(unlabeled_folder(camera_folders))
    assert adaptation["final_clusters"]["clusters"] >= 2 and adaptation["nformer_epochs"] == 1
    assert {"encoder.onnx", "nformer.onnx", "weights.pt"} <= set(card["files"])
    assert card["files"]["encoder.onnx"] != parent.card["files"]["encoder.onnx"], "the encoder was fine-tuned"

    # same input contract as the parent, different (adapted) features
    x = np.random.default_rng(0).standard_normal((2, 3, card["input"]["height"], card["input"]["width"]))
    feats = [ort.InferenceSession(str(b / "encoder.onnx")).run(None, {"images": x.astype(np.float32)})[0]
             for b in (PARENT, out)]
    assert feats[0].shape == feats[1].shape and not np.allclose(feats[0], feats[1], atol=1e-4)


def test_adapt_refuses_what_it_cannot_do(camera_folders, tmp_path):
    cfg = GRACLConfig(epochs=1)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(PARENT, no_weights, ignore=shutil.ignore_patterns("weights.pt"))
    with pytest.raises(AdaptationError, match="weights.pt"):
        adapt_bundle(no_weights, camera_folders, tmp_path / "a", cfg)
    tampered = tmp_path / "tampered"
    shutil.copytree(PARENT, tampered)
    with open(tampered / "weights.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(AdaptationError, match="sha256"):
        adapt_bundle(tampered, camera_folders, tmp_path / "b", cfg)
    with pytest.raises(AdaptationError, match="exists"):
        adapt_bundle(PARENT, camera_folders, tmp_path, cfg)
    few = tmp_path / "few"
    few.mkdir()
    for path in list(camera_folders.rglob("*.jpg"))[:10]:
        shutil.copy(path, few / path.name)
    with pytest.raises(AdaptationError, match="at least"):
        adapt_bundle(PARENT, few, tmp_path / "c", cfg)


def test_images_digest_identifies_the_bytes_not_the_names(camera_folders, tmp_path):
    samples = unlabeled_folder(camera_folders)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, s in enumerate(reversed(samples)):
        shutil.copy(s.path, renamed / f"{i}.jpg")
    assert images_digest(unlabeled_folder(renamed)) == images_digest(samples)
    assert images_digest(samples[1:]) != images_digest(samples)
    assert len(hashlib.sha256(b"").hexdigest()) == len(images_digest(samples))
