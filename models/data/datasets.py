"""Dataset readers. Each returns `Sample(path, pid, camid)` lists; no torch needed.

Readers know two layouts:
- Market-1501 (`bounding_box_train/`, `bounding_box_test/`, `query/`, names `PPPP_cC...jpg`; gallery id -1
  is junk, ignored by the evaluator, and id 0 distractors, wrong answers to every query; neither is trained on)
  and any folder of `<pid>_c<cam>_*.jpg` files (a custom dataset);
- the four real sets in `../shared/data` (PRID450S, PRID2011, VIPeR half, multi-shot CUHK03) with their
  standard protocols, split by `split_identities` (the one place a split is defined).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")


class Sample(NamedTuple):
    path: str
    pid: int
    camid: int


@dataclass
class ReIDDataset:
    """A named train/query/gallery split. Empty lists where a part does not exist."""

    name: str
    train: list[Sample] = field(default_factory=list)
    query: list[Sample] = field(default_factory=list)
    gallery: list[Sample] = field(default_factory=list)
    protocol: str = ""

    def describe(self) -> str:
        def ids(s):
            return len({x.pid for x in s})

        return (
            f"{self.name}: train {len(self.train)} images / {ids(self.train)} ids, "
            f"query {len(self.query)} / {ids(self.query)}, gallery {len(self.gallery)} / {ids(self.gallery)}"
        )


def split_identities(ids, n_train: int, seed: int) -> tuple[list[int], list[int]]:
    """Split k of every protocol: sorted ids, permuted by numpy's default_rng(k), first n_train train."""
    ordered = np.array(sorted(set(ids)))
    perm = np.random.default_rng(seed).permutation(ordered)
    return sorted(int(i) for i in perm[:n_train]), sorted(int(i) for i in perm[n_train:])


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_market_folder(folder: str | Path) -> list[Sample]:
    """Images named `<pid>_c<cam>...`; other files are skipped."""
    samples = []
    for p in _images(Path(folder)):
        m = MARKET_NAME.match(p.name)
        if m:
            samples.append(Sample(str(p), int(m.group(1)), int(m.group(2))))
    return samples


def market1501(root: str | Path) -> ReIDDataset:
    root = Path(root)
    train = [s for s in read_market_folder(root / "bounding_box_train") if s.pid > 0]
    return ReIDDataset(
        name=f"market:{root.name}",
        train=train,
        query=read_market_folder(root / "query"),
        gallery=read_market_folder(root / "bounding_box_test"),
        protocol="market1501",
    )


def custom_folder(root: str | Path) -> ReIDDataset:
    """A folder of `<pid>_c<cam>_*.jpg` files is a training set; `query/` + `gallery/` subfolders, if
    present, are its test split."""
    root = Path(root)
    if (root / "bounding_box_train").is_dir():
        return market1501(root)
    ds = ReIDDataset(name=f"folder:{root.name}", train=[s for s in read_market_folder(root) if s.pid > 0])
    if (root / "query").is_dir() and (root / "gallery").is_dir():
        ds.query, ds.gallery = read_market_folder(root / "query"), read_market_folder(root / "gallery")
    return ds


def unlabeled_folder(root: str | Path) -> list[Sample]:
    """Every image under `root`, for unsupervised training and adaptation. A Market-style name
    (`<pid>_c<cam>...`) gives identity and camera; otherwise the identity is unknown (-1) and the camera is
    the first-level subfolder (`root/<camera>/...`, numbered in sorted order), or 0 for files at the top."""
    root = Path(root)
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    folders = sorted({p.relative_to(root).parts[0] for p in paths if p.parent != root})
    camera_of = {name: i + 1 for i, name in enumerate(folders)}
    samples = []
    for p in paths:
        m = MARKET_NAME.match(p.name)
        if m:
            samples.append(Sample(str(p), int(m.group(1)), int(m.group(2))))
        else:
            top = p.relative_to(root).parts[0] if p.parent != root else None
            samples.append(Sample(str(p), -1, camera_of.get(top, 0)))
    return samples


def _probe_a_gallery_b(name: str, samples: list[Sample], n_train: int, split: int, protocol: str) -> ReIDDataset:
    """Single-shot two-camera protocol: split identities, probe = camera 1 (A), gallery = camera 2 (B)."""
    train_ids, test_ids = split_identities([s.pid for s in samples], n_train, split)
    train_set, test_set = set(train_ids), set(test_ids)
    return ReIDDataset(
        name=f"{name}/split{split}",
        train=[s for s in samples if s.pid in train_set],
        query=[s for s in samples if s.pid in test_set and s.camid == 1],
        gallery=[s for s in samples if s.pid in test_set and s.camid == 2],
        protocol=protocol,
    )


def _id_then_camera_files(root: Path) -> list[Sample]:
    """`IIIICCC.png` / `IIIICCCC.png`: 4-digit identity, then the camera number."""
    return [Sample(str(p), int(p.stem[:4]), int(p.stem[4:])) for p in _images(Path(root))]


def prid450s(root: str | Path, split: int = 0) -> ReIDDataset:
    """450 ids, one image per camera (`IIIICCC.png`, 001 = A, 002 = B); 225/225; probe A, gallery B."""
    return _probe_a_gallery_b("prid450s", _id_then_camera_files(root), 225, split,
                              "prid450s: 225 train / 225 test ids, probe camera A, gallery camera B")


def prid2011(root: str | Path, split: int = 0) -> ReIDDataset:
    """Single-shot PRID2011: ids 1-200 in both cameras (100 train / 100 test); probe = test ids in A;
    gallery = test ids in B + the 549 B-only people (ids 201-749) as distractors."""
    root = Path(root)

    def read(cam_dir: str, camid: int) -> list[Sample]:
        return [Sample(str(p), int(p.stem.split("_")[1]), camid) for p in _images(root / cam_dir)]

    cam_a, cam_b = read("cam_a", 1), read("cam_b", 2)
    train_ids, test_ids = split_identities(range(1, 201), 100, split)
    train_set, test_set = set(train_ids), set(test_ids)
    return ReIDDataset(
        name=f"prid2011/split{split}",
        train=[s for s in cam_a + cam_b if s.pid in train_set],
        query=[s for s in cam_a if s.pid in test_set],
        gallery=[s for s in cam_b if s.pid in test_set or s.pid > 200],
        protocol="prid2011: 100 train / 100 test shared ids, probe A, gallery B + 549 B-only distractors",
    )


def viper(root: str | Path, split: int = 0) -> ReIDDataset:
    """This half of VIPeR: 316 ids (`IIIICCCC.png`, 0001 = A, 0002 = B); 158/158; probe A, gallery B."""
    return _probe_a_gallery_b("viper", _id_then_camera_files(root), 158, split,
                              "viper (half): 158 train / 158 test ids, probe A, gallery B")


def cuhk01(root: str | Path, split: int = 0) -> ReIDDataset:
    """CUHK01 (`IIIIVVV.png`, views 001/002 = camera A, 003/004 = camera B): 485 train / 486 test ids; probe
    camera A, gallery camera B (2 true matches per query)."""
    samples = [Sample(str(p), int(p.stem[:4]), 1 if int(p.stem[4:]) <= 2 else 2) for p in _images(Path(root))]
    return _probe_a_gallery_b("cuhk01", samples, 485, split,
                              "cuhk01: 485 train / 486 test ids, probe camera A, gallery camera B")


def pku_reid(root: str | Path, split: int = 0) -> ReIDDataset:
    """PKU-Reid, 74 ids here (`III_CC_O.png`: identity, camera 01/02, orientation 1-8): 37 / 37 ids;
    probe camera 01, gallery camera 02 (8 true matches per query)."""
    samples = []
    for p in _images(Path(root)):
        pid, cam, _orientation = p.stem.split("_")
        samples.append(Sample(str(p), int(pid), int(cam)))
    return _probe_a_gallery_b("pku_reid", samples, 37, split,
                              "pku_reid: 37 train / 37 test ids, probe camera 01, gallery camera 02")


def all_identities(dataset: ReIDDataset) -> ReIDDataset:
    """Every identity of a protocol as training data (for models evaluated on other sets)."""
    base = dataset.name.split("/")[0]
    return ReIDDataset(name=f"{base}/all", train=sorted(dataset.train + dataset.query + dataset.gallery))


def viper_all(root: str | Path) -> ReIDDataset:
    """All 316 VIPeR identities as training data (for models evaluated elsewhere)."""
    return all_identities(viper(root, 0))


CUHK03_PAIR_STARTS = (0, 843, 1283, 1360, 1418)  # first identity of camera pairs 1..5


def cuhk03_camera(pid: int, slot: int) -> int:
    pair = sum(pid >= start for start in CUHK03_PAIR_STARTS)
    return 2 * pair - 1 if slot < 5 else 2 * pair


def cuhk03(root: str | Path, split: int = 0) -> ReIDDataset:
    """Multi-shot CUHK03 (`PPPP_SS.jpg`): 767 train / 350 test ids; per test id and camera the
    lowest-numbered image is a query, all its other images are gallery."""
    root = Path(root)
    samples = []
    for p in _images(root):
        pid, slot = (int(x) for x in p.stem.split("_"))
        samples.append(Sample(str(p), pid, cuhk03_camera(pid, slot)))
    train_ids, test_ids = split_identities([s.pid for s in samples], 767, split)
    train_set, test_set = set(train_ids), set(test_ids)
    query, gallery, seen = [], [], set()
    for s in samples:  # sorted by name, so the first seen per (pid, cam) is the lowest-numbered
        if s.pid not in test_set:
            continue
        if (s.pid, s.camid) in seen:
            gallery.append(s)
        else:
            seen.add((s.pid, s.camid))
            query.append(s)
    return ReIDDataset(
        name=f"cuhk03/split{split}",
        train=[s for s in samples if s.pid in train_set],
        query=query,
        gallery=gallery,
        protocol="cuhk03 multi-shot: 767 train / 350 test ids, first image per id and camera is a query",
    )


SHARED_READERS = {"prid450s": prid450s, "prid2011": prid2011, "viper": viper, "cuhk03": cuhk03, "cuhk01": cuhk01,
                  "pku-reid": pku_reid}
SHARED_FOLDERS = {"pku-reid": "pku_reid"}
# sets usable whole as training data (`<name>-all`); PRID2011's camera-B-only people have no match, and
# PRID450S shares its people with PRID2011, so neither is offered whole
WHOLE_SETS = ("viper", "cuhk01", "pku-reid")


def shared_data_dir() -> Path | None:
    """`../shared/data` relative to the project root (or $REID_SHARED_DATA), if present."""
    import os

    env = os.environ.get("REID_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data")
    candidates.append(Path.cwd().parent / "shared" / "data")
    for c in candidates:
        if (c / "README.md").exists() or (c / "prid2011").is_dir():
            return c
    return None


def load_dataset(spec: str, split: int = 0) -> ReIDDataset:
    """`prid2011`, `cuhk03`, `prid450s`, `viper`, `cuhk01`, `pku-reid` (from the shared data, split `split`),
    `viper-all`, `cuhk01-all`, `pku-reid-all` (every identity, for training), or a folder path (Market-1501
    layout or a custom `<pid>_c<cam>` folder)."""
    name = spec.lower()
    whole = name.endswith("-all") and name[:-4] in WHOLE_SETS
    reader = name[:-4] if whole else name
    if reader in SHARED_READERS:
        base = shared_data_dir()
        if base is None:
            raise FileNotFoundError(
                f"dataset {spec!r} needs the shared data folder (../shared/data or $REID_SHARED_DATA)"
            )
        dataset = SHARED_READERS[reader](base / SHARED_FOLDERS.get(reader, reader), split)
        return all_identities(dataset) if whole else dataset
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"no dataset named {spec!r} and no such folder")
    return custom_folder(path)


def combine_for_training(datasets: list[ReIDDataset]) -> tuple[list[Sample], list[str]]:
    """Merge training parts: identities and cameras renumbered so sets never collide.
    Returns samples with contiguous labels 0..C-1 and the label names (`dataset:pid`)."""
    label_of: dict[tuple[str, int], int] = {}
    names: list[str] = []
    merged: list[Sample] = []
    cam_offset = 0
    for ds in datasets:
        max_cam = 0
        for s in ds.train:
            key = (ds.name, s.pid)
            if key not in label_of:
                label_of[key] = len(names)
                names.append(f"{ds.name}:{s.pid}")
            merged.append(Sample(s.path, label_of[key], cam_offset + s.camid))
            max_cam = max(max_cam, s.camid)
        cam_offset += max_cam
    return merged, names
