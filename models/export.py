"""Export a trained checkpoint to a model bundle: `encoder.onnx` (input `images` [B,3,H,W], dynamic B;
output `features` [B,D], L2-normalised) and the `model.json` card with preprocessing, dims, recipe,
training data, evaluation figures and the sha256 of each file.

With an NFormer stage-2 checkpoint the bundle also gets `nformer.onnx`: inputs `features` [N,D] (L2-normalised),
`neighbors` [N,k'] (each row's top-k' by cosine, itself included, k' = min(k, N)) and `landmarks` [layers,L']
(L' = min(L, N)); output `refined` [N,D], L2-normalised. N, k' and L' are dynamic.

With `include_weights` (the default) the bundle also carries `weights.pt`: the encoder's torch weights, so
that `reid adapt` can fine-tune a deployed bundle. Serving never reads it.

The export is checked: torch and ONNX Runtime must agree on the encoder at batch 1 and 8 on real images, and
on the NFormer at several N (below and above k), rtol 1e-3, atol 1e-5; otherwise no bundle is written."""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from index.bundle import (ENCODER_FILE, NFORMER_FILE, NFORMER_INT8_FILE, WEIGHTS_FILE, InputSpec, read_card,
                          sha256_file, write_card)
from index.files import atomic_write
from index.refine import sample_landmarks, topk_neighbors

from .data.transforms import TestTransform, load_rgb
from .nformer import ExportableNFormer
from .nformer_int8 import QuantisationDrift, add_to_bundle as add_int8_nformer
from .nformer_train import load_trained_nformer
from .reid_model import NormalizedEncoder
from .train import load_trained_model

RTOL, ATOL = 1e-3, 1e-5


class ExportMismatch(RuntimeError):
    """ONNX Runtime does not reproduce torch: the bundle is refused."""


def export_onnx(encoder: torch.nn.Module, spec: InputSpec, path: Path) -> None:
    dummy = torch.zeros(2, 3, spec.height, spec.width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # The TorchScript exporter gives a compact, static graph for a plain CNN.
        torch.onnx.export(
            encoder, (dummy,), str(path), input_names=["images"], output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, opset_version=17, dynamo=False,
        )


def check_onnx_matches_torch(encoder, onnx_path: Path, images: np.ndarray) -> dict:
    """Compare at batch 1 and batch 8 (images repeated if fewer than 8 are given)."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    report = {}
    for batch in (1, 8):
        x = np.resize(images, (batch, *images.shape[1:])).astype(np.float32)
        with torch.no_grad():
            expected = encoder(torch.from_numpy(x)).numpy()
        got = session.run(["features"], {"images": x})[0]
        max_abs = float(np.abs(got - expected).max())
        report[f"batch{batch}_max_abs_diff"] = max_abs
        if not np.allclose(got, expected, rtol=RTOL, atol=ATOL):
            raise ExportMismatch(f"ONNX Runtime differs from torch at batch {batch}: max |diff| {max_abs:.2e}")
    return report


NFORMER_CHECK_SIZES = (1, 2, 7, 20, 64, 301)


def export_nformer(nformer, path: Path) -> None:
    n, k, layers, count = 64, nformer.cfg.topk, nformer.cfg.layers, nformer.cfg.landmarks
    features = torch.nn.functional.normalize(torch.randn(n, nformer.cfg.dim), dim=1)
    neighbors = torch.from_numpy(topk_neighbors(features.numpy(), k))
    landmarks = torch.from_numpy(sample_landmarks(n, layers, count))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ExportableNFormer(nformer), (features, neighbors, landmarks), str(path),
            input_names=["features", "neighbors", "landmarks"], output_names=["refined"],
            dynamic_axes={"features": {0: "n"}, "neighbors": {0: "n", 1: "k"}, "landmarks": {1: "l"},
                          "refined": {0: "n"}},
            opset_version=20, dynamo=False,  # 20: GELU is one Gelu node, not its tanh formula in 8 nodes
        )


def check_nformer_matches_torch(nformer, onnx_path: Path, sizes=NFORMER_CHECK_SIZES, seed: int = 0) -> dict:
    """Clustered random features (so reciprocal neighbourhoods are non-trivial) at each N, against the module's
    own `forward` (the path that trains), not the leaner path the graph was exported from."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng, report = np.random.default_rng(seed), {}
    nformer.eval()
    for n in sizes:
        centres = rng.standard_normal((max(1, n // 5), nformer.cfg.dim))
        x = centres[rng.integers(len(centres), size=n)] + 0.5 * rng.standard_normal((n, nformer.cfg.dim))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        inputs = {"features": x, "neighbors": topk_neighbors(x, nformer.cfg.topk),
                  "landmarks": sample_landmarks(n, nformer.cfg.layers, nformer.cfg.landmarks)}
        with torch.no_grad():
            refined = nformer(torch.from_numpy(x)[None], landmarks=torch.from_numpy(inputs["landmarks"]),
                              neighbors=torch.from_numpy(inputs["neighbors"])[None])[0]
            expected = torch.nn.functional.normalize(refined, dim=-1).numpy()
        got = session.run(["refined"], inputs)[0]
        max_abs = float(np.abs(got - expected).max())
        report[f"n{n}_max_abs_diff"] = max_abs
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=RTOL, atol=ATOL):
            raise ExportMismatch(f"{NFORMER_FILE} differs from torch at N={n}: max |diff| {max_abs:.2e}")
    return report


def nformer_card(nformer, state: dict, parity: dict) -> dict:
    return {
        **nformer.cfg.card(),
        "inputs": {"features": "[N, D] float32, L2-normalised encoder features",
                   "neighbors": "[N, k'] int64, each row's top-k' by cosine (itself included), k' = min(topk, N)",
                   "landmarks": "[layers, L'] int64, distinct token indices per layer, L' = min(landmarks, N)"},
        "output": "refined [N, D], L2-normalised post-BN NFormer features",
        "landmark_rule": "numpy default_rng(landmark_seed).choice(N, L', replace=False), once per layer",
        "stage2": state["config"],
        "stage2_epochs_trained": state["epoch"],
        "export_check": {"rtol": RTOL, "atol": ATOL, **parity},
    }


def write_training_weights(state: dict, path: Path) -> None:
    """A checkpoint `load_trained_model` reads, without optimiser state, its tensors in float16: a starting
    point for fine-tuning (loading casts back to float32), at a sixth of `last.pt`'s size."""
    keep = ("config", "input", "num_classes", "label_names", "epoch", "method", "lineage")
    model = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save({"model": model, **{k: state[k] for k in keep if k in state}}, path)


def export_bundle(checkpoint: str | Path, out_dir: str | Path, check_images: list[str], name: str = "reid-model",
                  version: str | None = None, extra_card: dict | None = None,
                  nformer_checkpoint: str | Path | None = None, include_weights: bool = True,
                  query_flip: bool = False) -> dict:
    """Write the bundle to `out_dir` (replacing it only once everything checked out). Returns the card.
    `query_flip`: the card tells the service and the evaluator to embed queries flip-averaged."""
    if not check_images:
        raise ValueError("export needs real images to check ONNX Runtime against torch")
    model, spec, state = load_trained_model(checkpoint)
    cfg = state["config"]
    encoder = NormalizedEncoder(model, flip_average=bool(cfg.get("flip_average"))).eval()
    transform = TestTransform(spec)
    images = np.stack([transform(load_rgb(p)) for p in check_images[:8]])

    out_dir = Path(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out_dir.parent if out_dir.parent.exists() else None))
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is read by other users (the container)
    try:
        onnx_path = staging / ENCODER_FILE
        export_onnx(encoder, spec, onnx_path)
        parity = check_onnx_matches_torch(encoder, onnx_path, images)
        card = {
            "name": name,
            "version": version or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d.%H%M%S"),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "backbone": cfg["backbone"],
            "input": spec.card(),
            "embedding_dim": int(model.embedding_dim),
            "normalized": True,
            "query_flip": bool(query_flip),
            "outputs": {ENCODER_FILE: "features [B, D], L2-normalised BNNeck feature"},
            "recipe": cfg,
            "training_data": {"datasets": cfg["train_data"], "split": cfg["split"],
                              "identities": state["num_classes"], "epochs_trained": state["epoch"]},
            # every training cycle from ImageNet to this bundle (warm restarts: `reid train --init`)
            "lineage": state.get("lineage") or [],
            "export_check": {"rtol": RTOL, "atol": ATOL, **parity},
            "evaluation": {},
            "files": {ENCODER_FILE: sha256_file(onnx_path)},
            **(extra_card or {}),
        }
        if include_weights:
            write_training_weights(state, staging / WEIGHTS_FILE)
            card["outputs"][WEIGHTS_FILE] = "float16 torch weights of the encoder (for `reid adapt`; not used to serve)"
            card["files"][WEIGHTS_FILE] = sha256_file(staging / WEIGHTS_FILE)
        write_card(staging, card)
        if nformer_checkpoint:
            card = attach_nformer(staging, nformer_checkpoint)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
        return card
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def attach_nformer(bundle_dir: str | Path, nformer_checkpoint: str | Path) -> dict:
    """Export an NFormer stage-2 checkpoint into a bundle: `nformer.onnx` (checked against torch) and its int8
    graph (checked against fp32; left out with a warning when it drifts), both listed in the card. Replaces the
    bundle's NFormer if it has one; the encoder, its vectors and the card's version are untouched."""
    bundle_dir = Path(bundle_dir)
    card = read_card(bundle_dir)
    nformer = load_trained_nformer(nformer_checkpoint)
    if nformer.cfg.dim != card["embedding_dim"]:
        raise ValueError(f"NFormer width {nformer.cfg.dim} != encoder embedding {card['embedding_dim']}")
    with atomic_write(bundle_dir / NFORMER_FILE) as staged:  # a failed check leaves the bundle as it was
        export_nformer(nformer, staged)
        parity = check_nformer_matches_torch(nformer, staged)
    state = torch.load(nformer_checkpoint, map_location="cpu", weights_only=False)
    card["nformer"] = nformer_card(nformer, state, parity)
    card.setdefault("outputs", {})[NFORMER_FILE] = card["nformer"]["output"]
    card["files"][NFORMER_FILE] = sha256_file(bundle_dir / NFORMER_FILE)
    card["files"].pop(NFORMER_INT8_FILE, None)  # until the new one is checked
    (bundle_dir / NFORMER_INT8_FILE).unlink(missing_ok=True)
    write_card(bundle_dir, card)
    try:  # the int8 NFormer that serves refinement, checked against the fp32 one
        add_int8_nformer(bundle_dir)
    except QuantisationDrift as e:  # the bundle still serves, on its fp32 NFormer
        warnings.warn(f"{e}: the bundle ships no int8 NFormer")
    return read_card(bundle_dir)


def update_card_evaluation(bundle_dir: str | Path, evaluation: dict) -> dict:
    """Record evaluation figures in the card (the card is not hashed; the model files are)."""
    card = read_card(bundle_dir)
    card.setdefault("evaluation", {}).update(evaluation)
    write_card(bundle_dir, card)
    return card
