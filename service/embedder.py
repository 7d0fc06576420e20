"""ONNX Runtime image embedder driven by a model bundle's card (no torch).

Preprocessing (:func:`preprocess`) follows the card's ``input`` block: convert to RGB,
resize to (width, height) with PIL bilinear, scale to [0, 1], ``(x - mean) / std``, HWC -> CHW
(channels flipped if ``channel_order`` is ``"BGR"``). Outputs are L2-normalised float32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from index.bundle import Bundle, BundleError, load_bundle
from index.vector_index import l2_normalize


__all__ = ["Embedder", "mirror", "preprocess", "preprocess_batch", "l2_normalize"]


def mirror(image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    """The image flipped left to right (a PIL image, or a uint8 array (H, W[, 3]))."""
    if isinstance(image, np.ndarray):
        return np.ascontiguousarray(image[:, ::-1])
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _resized_rgb(image: Image.Image | np.ndarray, w: int, h: int) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"array images must be uint8, got {image.dtype}")
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (w, h):
        image = image.resize((w, h), Image.BILINEAR)
    return np.asarray(image)


def preprocess_batch(images: Sequence[Image.Image | np.ndarray], card_input: dict[str, Any]) -> np.ndarray:
    """Images -> float32 (N, 3, H, W) ready for the encoder: resized in uint8, then normalised in one pass
    over the batch (x * 1/(255 std) - mean/std, the same as ((x / 255) - mean) / std up to rounding)."""
    w, h = int(card_input["width"]), int(card_input["height"])
    x = np.stack([_resized_rgb(im, w, h) for im in images]) if len(images) else np.zeros((0, h, w, 3), np.uint8)
    std = np.asarray(card_input["std"], dtype=np.float32)
    scale, shift = (1.0 / (255.0 * std)).astype(np.float32), (np.asarray(card_input["mean"], np.float32) / std)
    if card_input.get("channel_order", "RGB") == "BGR":
        x, scale, shift = x[..., ::-1], scale[::-1], shift[::-1]
    out = np.empty((len(x), 3, h, w), np.float32)
    for c in range(3):  # channel planes straight into the CHW layout: no HWC float temporary
        np.multiply(x[..., c], scale[c], out=out[:, c], casting="unsafe")
        out[:, c] -= shift[c]
    return out


def preprocess(image: Image.Image | np.ndarray, card_input: dict[str, Any]) -> np.ndarray:
    """One image -> float32 array (3, H, W) ready for the encoder.

    ``image`` is a PIL image (any mode) or a uint8 array (H, W, 3) in RGB / (H, W) grey.
    """
    return preprocess_batch([image], card_input)[0]


def _providers() -> list[str]:
    available = ort.get_available_providers()
    wanted = [p for p in ("CUDAExecutionProvider",) if p in available]
    return wanted + ["CPUExecutionProvider"]


class Embedder:
    """Embed images with a bundle's ``encoder.onnx``.

    ``Embedder(bundle_or_path, threads=0, batch_size=32, spin=True)``; ``embed(images) -> (N, D)``.
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, threads: int = 0, batch_size: int = 32,
                 spin: bool = True):
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle)
        self.bundle = bundle
        self.card_input = dict(bundle.input)
        self.dim = bundle.embedding_dim
        self.query_flip = bundle.query_flip
        self.batch_size = max(1, int(batch_size))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:  # idle pool threads sleep instead of busy-waiting for the next run (see Settings.ort_spin)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(bundle.encoder_path), sess_options=opts,
                                                providers=_providers())
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"cannot load {bundle.encoder_path}: {e}") from e
        inputs = self.session.get_inputs()
        names = [i.name for i in inputs]
        self.input_name = "images" if "images" in names else names[0]
        outs = [o.name for o in self.session.get_outputs()]
        self.output_name = "features" if "features" in outs else outs[0]
        # Fail at load time, not on the first request, if the encoder disagrees with its card.
        probe = self._run(np.zeros((1, 3, self.card_input["height"], self.card_input["width"]), np.float32))
        if probe.shape != (1, self.dim):
            raise BundleError(f"{bundle.encoder_path} outputs shape {probe.shape[1:]} per image, "
                              f"but the card says embedding_dim={self.dim}")

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _run(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: batch})[0]
        return np.asarray(out, dtype=np.float32).reshape(batch.shape[0], -1)

    def embed_arrays(self, chw: np.ndarray) -> np.ndarray:
        """Already preprocessed (N, 3, H, W) float32 -> (N, D) L2-normalised."""
        chw = np.asarray(chw, dtype=np.float32)
        if chw.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        outs = [self._run(np.ascontiguousarray(chw[i:i + self.batch_size]))
                for i in range(0, chw.shape[0], self.batch_size)]
        return l2_normalize(np.concatenate(outs, axis=0))

    def embed(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        """PIL images or uint8 RGB arrays -> (N, D) float32, L2-normalised."""
        images = list(images)
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.embed_arrays(self.preprocess(images))

    def preprocess(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        """Images -> (N, 3, H, W) float32 for :meth:`embed_arrays` (callers may do this in their own thread)."""
        return preprocess_batch(list(images), self.card_input)

    def embed_paths(self, paths: Iterable[str | os.PathLike], progress: bool = True,
                    desc: str = "embedding") -> np.ndarray:
        """Embed image files (any PIL-readable format) -> (N, D), in the order given."""
        from tqdm.auto import tqdm

        paths = [Path(p) for p in paths]
        outs = []
        with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
            for i in range(0, len(paths), self.batch_size):
                chunk = paths[i:i + self.batch_size]
                arrs = []
                for p in chunk:
                    with Image.open(p) as im:
                        arrs.append(preprocess(im, self.card_input))
                outs.append(self._run(np.stack(arrs)))
                bar.update(len(chunk))
        if not outs:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(np.concatenate(outs, axis=0))
