"""The model bundle, the contract between training (`models/`) and serving (`service/`): its file names, its
card (``model.json``, read and written here only), the input spec and the NFormer spec. It lives in the
lowest room, on the standard library alone, so every room reads a bundle one way.

A bundle is a directory with the card and ``encoder.onnx``. The card lists the sha256 of every file it ships
in ``files``; :func:`load_bundle` refuses a bundle whose files are missing or whose hashes do not match
(:class:`BundleError`).

Card fields every reader relies on::

    name, version, embedding_dim, normalized (bool),
    input: {height, width, channel_order: "RGB", mean: [3], std: [3]}
    files: {"encoder.onnx": "<sha256 hex>", ...}

Optional files, used only when the card lists them (and then verified like the others): ``nformer.onnx``
(search-time refinement, described by the card's ``nformer`` entry), ``nformer.int8.onnx`` (its int8
graph) and ``weights.pt`` (the encoder's torch weights, which ``reid adapt`` fine-tunes; serving never
reads it).

Pixels are scaled to [0, 1] then normalised as ``(x - mean) / std``. ``query_flip`` (bool, optional, default
false): a query image is embedded as the L2-normalised mean of its embedding and its mirror image's (two
encoder runs per query; gallery images, and so the stored vectors, stay one run each). Other fields
(``backbone``, ``recipe``, ``training_data``, ``evaluation`` ...) are free-form and passed through by
``GET /v1/model``. The card itself is not hashed, so evaluation figures can be added after export.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import atomic_write

__all__ = ["Bundle", "BundleError", "InputSpec", "NFormerSpec", "load_bundle", "read_card", "write_card",
           "validate_card", "sha256_file", "nformer_file", "CARD_FILE", "ENCODER_FILE", "WEIGHTS_FILE",
           "NFORMER_FILE", "NFORMER_INT8_FILE", "IMAGENET_MEAN", "IMAGENET_STD"]

CARD_FILE = "model.json"
ENCODER_FILE = "encoder.onnx"
WEIGHTS_FILE = "weights.pt"
NFORMER_FILE = "nformer.onnx"
NFORMER_INT8_FILE = "nformer.int8.onnx"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BundleError(ValueError):
    """The bundle is missing, malformed, or its card does not match its files."""


# ------------------------------------------------------------------------------------------ the specs


@dataclass(frozen=True)
class InputSpec:
    """What the encoder expects; written into the card so serving preprocesses as training did."""

    height: int = 256
    width: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def card(self) -> dict:
        return {"height": self.height, "width": self.width, "channel_order": "RGB",
                "scale": "1/255", "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_card(cls, entry: dict) -> "InputSpec":
        """From the card's ``input`` entry."""
        return cls(int(entry["height"]), int(entry["width"]), tuple(entry["mean"]), tuple(entry["std"]))


@dataclass
class NFormerSpec:
    """The card's ``nformer`` entry: what the refiner needs to feed ``nformer.onnx``."""

    dim: int
    layers: int
    landmarks: int
    topk: int
    landmark_seed: int = 0

    @classmethod
    def from_card(cls, entry: dict) -> "NFormerSpec":
        return cls(int(entry["dim"]), int(entry["layers"]), int(entry["landmarks"]), int(entry["topk"]),
                   int(entry.get("landmark_seed", 0)))


def nformer_file(files: dict, precision: str = "int8") -> str | None:
    """Which of a bundle's ``files`` refines at ``precision``: its int8 graph when asked for and shipped, else
    ``nformer.onnx``; None when the bundle has no NFormer."""
    if NFORMER_FILE not in files:
        return None
    return NFORMER_INT8_FILE if precision == "int8" and NFORMER_INT8_FILE in files else NFORMER_FILE


# ------------------------------------------------------------------------------------------- the card


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_card(bundle_dir: str | Path, card: dict) -> None:
    """Replace a bundle's card atomically: a reader never sees half a card."""
    with atomic_write(Path(bundle_dir) / CARD_FILE) as staged:
        staged.write_text(json.dumps(card, indent=2) + "\n")


def read_card(bundle_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """The card of a bundle directory, validated and, with ``verify``, every listed file's sha256 checked
    (:class:`BundleError` otherwise)."""
    return load_bundle(bundle_dir, verify).card


@dataclass(frozen=True)
class Bundle:
    path: Path
    card: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.card["name"])

    @property
    def version(self) -> str:
        return str(self.card["version"])

    @property
    def model_id(self) -> str:
        """``name:version`` — stored with every vector and returned by search."""
        return f"{self.name}:{self.version}"

    @property
    def embedding_dim(self) -> int:
        return int(self.card["embedding_dim"])

    @property
    def input(self) -> dict[str, Any]:
        return self.card["input"]

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_card(self.input)

    @property
    def normalized(self) -> bool:
        return bool(self.card.get("normalized", False))

    @property
    def query_flip(self) -> bool:
        """Whether queries are embedded flip-averaged (see the module's docstring)."""
        return bool(self.card.get("query_flip", False))

    @property
    def encoder_path(self) -> Path:
        return self.path / ENCODER_FILE

    def file(self, name: str) -> Path | None:
        """Path of an optional file listed in the card (e.g. ``nformer.onnx``), else None."""
        return self.path / name if name in self.card.get("files", {}) else None


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise BundleError(msg)


def validate_card(card: Any, where: str = CARD_FILE) -> None:
    _require(isinstance(card, dict), f"{where}: the card must be a JSON object")
    for key in ("name", "version", "input", "embedding_dim", "files"):
        _require(key in card, f"{where}: missing required field {key!r}")
    _require(isinstance(card["name"], str) and card["name"], f"{where}: 'name' must be a non-empty string")
    dim = card["embedding_dim"]
    _require(isinstance(dim, int) and not isinstance(dim, bool) and dim > 0,
             f"{where}: 'embedding_dim' must be a positive integer, got {dim!r}")
    inp = card["input"]
    _require(isinstance(inp, dict), f"{where}: 'input' must be an object")
    for key in ("height", "width"):
        v = inp.get(key)
        _require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{where}: input.{key} must be a positive integer, got {v!r}")
    order = inp.get("channel_order", "RGB")
    _require(order in ("RGB", "BGR"), f"{where}: input.channel_order must be 'RGB' or 'BGR', got {order!r}")
    for key in ("mean", "std"):
        v = inp.get(key)
        _require(isinstance(v, (list, tuple)) and len(v) == 3
                 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v),
                 f"{where}: input.{key} must be a list of 3 numbers, got {v!r}")
    _require(all(x > 0 for x in inp["std"]), f"{where}: input.std values must be > 0")
    _require(isinstance(card.get("query_flip", False), bool), f"{where}: 'query_flip' must be true or false")
    files = card["files"]
    _require(isinstance(files, dict) and ENCODER_FILE in files,
             f"{where}: 'files' must be an object listing at least {ENCODER_FILE!r} with its sha256")
    for name, digest in files.items():
        _require(isinstance(name, str) and "/" not in name and "\\" not in name and name not in ("", ".", ".."),
                 f"{where}: bad file name {name!r} in 'files'")
        _require(isinstance(digest, str) and len(digest) == 64
                 and all(c in "0123456789abcdef" for c in digest.lower()),
                 f"{where}: files[{name!r}] must be a sha256 hex digest")


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Load and validate a bundle directory; with ``verify`` check every file's sha256."""
    path = Path(path)
    card_path = path / CARD_FILE
    _require(path.is_dir(), f"model bundle directory not found: {path}")
    _require(card_path.is_file(), f"model bundle {path} has no {CARD_FILE}")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{card_path}: not valid JSON: {e}") from e
    validate_card(card, str(card_path))
    for name, digest in card["files"].items():
        f = path / name
        _require(f.is_file(), f"model bundle {path}: file {name!r} listed in the card is missing")
        if verify:
            actual = sha256_file(f)
            _require(actual == digest.lower(),
                     f"model bundle {path}: sha256 of {name!r} is {actual}, but the card says {digest}; "
                     "the card does not match its files (re-export the bundle)")
    return Bundle(path=path.resolve(), card=card)
