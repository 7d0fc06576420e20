"""Real inputs for every section: images from the shared data (PRID450S split 0 unless said otherwise),
preprocessed as the service does. Absent data is not an error: callers get None and note the skip."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from index.bundle import InputSpec, read_card
from models.data.datasets import ReIDDataset, load_dataset, shared_data_dir
from models.data.transforms import TestTransform, load_rgb

PROTOCOL = "prid450s"  # the shared protocol of the CMC plot, the search distribution and calibration


def card(bundle_dir: str | Path) -> dict:
    """The bundle's card, checked against its files as the service checks it."""
    return read_card(bundle_dir)


@lru_cache(maxsize=8)
def protocol(name: str = PROTOCOL, split: int = 0) -> ReIDDataset | None:
    if shared_data_dir() is None:
        return None
    try:
        return load_dataset(name, split)
    except FileNotFoundError:
        return None


def image_paths(n: int, name: str = PROTOCOL, part: str = "test") -> list[str]:
    """Up to ``n`` image files: ``test`` = the protocol's query + gallery, ``train`` = its training half
    (used to calibrate INT8, so the accuracy check never sees its calibration images)."""
    data = protocol(name)
    if data is None:
        return []
    samples = data.train if part == "train" else data.query + data.gallery
    return [s.path for s in samples[:n]]


def images(bundle_card: dict, n: int, part: str = "test", seed: int = 0) -> tuple[np.ndarray, str]:
    """[n,3,H,W] float32 preprocessed real images (cycled if fewer), and where they came from; random
    normalised noise when the shared data is absent."""
    spec = InputSpec.from_card(bundle_card["input"])
    paths = image_paths(n, part=part)
    if not paths:
        x = np.random.default_rng(seed).standard_normal((n, 3, spec.height, spec.width)).astype(np.float32)
        return x, "random noise (shared data absent)"
    transform = TestTransform(spec)
    arrays = np.stack([transform(load_rgb(p)) for p in paths])
    return np.resize(arrays, (n, *arrays.shape[1:])).astype(np.float32), f"{len(paths)} {PROTOCOL} {part} images"


def image_bytes(n: int) -> list[bytes]:
    """Encoded real image files (what a client uploads)."""
    return [Path(p).read_bytes() for p in image_paths(n)]


def as_jpeg(blobs: list[bytes], quality: int = 90) -> list[bytes]:
    """The same images re-encoded as JPEG (what camera pipelines send; the shared data ships PNG)."""
    import io

    from PIL import Image

    out = []
    for b in blobs:
        buf = io.BytesIO()
        Image.open(io.BytesIO(b)).convert("RGB").save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out
