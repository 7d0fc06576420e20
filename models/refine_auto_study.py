"""The measurements behind refine=auto's rule (index/gallery_profile.py): for galleries of every kind, the
label-free statistic (`neighbour_excess`) beside what each refinement mode gains over `none`.

Galleries: each protocol's test gallery, whole and cut to fewer identities (the statistic should not drift
with size), queries restricted to the same identities; galleries under MIN_ITEMS images are never refined.
The threshold sits midway between the galleries the auto mode harms and those it helps (`choose_threshold`).
Choose it with an encoder whose test identities are unseen (split 1's, or data it never trained on), never
on split 0's test identities."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from index.gallery_profile import MIN_ITEMS, profile_gallery
from index.metrics import evaluate_rankings
from index.refine import Refiner
from index.vector_index import l2_normalize

from .data.datasets import ReIDDataset, load_dataset

SIZES = (0, 150, 100, 50)  # identities kept in the gallery; 0 = all


@dataclass
class GalleryRow:
    protocol: str
    identities: int
    gallery: int
    images_per_identity: float
    excess: float
    map: dict[str, float]  # mode -> mAP (percent)

    def gain(self, mode: str) -> float:
        return self.map[mode] - self.map["none"]


def study_protocol(dataset: ReIDDataset, query: np.ndarray, gallery: np.ndarray, refiner: Refiner,
                   modes: list[tuple[str, int]], sizes=SIZES, seed: int = 0) -> list[GalleryRow]:
    q_pid = np.array([s.pid for s in dataset.query])
    g_pid = np.array([s.pid for s in dataset.gallery])
    q_cam = np.array([s.camid for s in dataset.query])
    g_cam = np.array([s.camid for s in dataset.gallery])
    query, gallery = l2_normalize(query), l2_normalize(gallery)
    people = np.unique(g_pid)
    rows = []
    for size in sizes:
        if size and size >= len(people):
            continue
        keep = people if not size else np.random.default_rng(seed).choice(people, size=size, replace=False)
        qm, gm = np.isin(q_pid, keep), np.isin(g_pid, keep)
        g = gallery[gm]
        profile = profile_gallery(g, len(g))
        result = {}
        for mode, k in modes:
            scores = refiner.with_candidates(k).similarities(mode, query[qm], g)
            result[label(mode, k)] = 100 * evaluate_rankings(-scores, q_pid[qm], g_pid[gm], q_cam[qm], g_cam[gm]).mAP
        rows.append(GalleryRow(dataset.name, len(keep), int(gm.sum()), round(gm.sum() / len(keep), 2),
                               round(profile.neighbour_excess, 3), {m: round(v, 2) for m, v in result.items()}))
    return rows


def label(mode: str, k: int) -> str:
    return mode if mode == "none" else f"{mode}@{k}"


def choose_threshold(rows: list[GalleryRow], mode: str, tolerance: float = 0.5) -> float:
    """Midway between the highest excess of a gallery that loses more than `tolerance` mAP to `mode` and the
    lowest excess above it of one that gains more than that: the widest margin on both sides. Galleries below
    MIN_ITEMS are never refined, so they do not count."""
    rows = [r for r in rows if r.gallery >= MIN_ITEMS]
    losing = max((r.excess for r in rows if r.gain(mode) < -tolerance), default=min(r.excess for r in rows))
    gaining = [r.excess for r in rows if r.gain(mode) > tolerance and r.excess > losing]
    return round((losing + min(gaining)) / 2, 2) if gaining else round(losing + 0.01, 2)


def run_study(embed, protocols: list[str], split: int, refiner: Refiner, modes: list[tuple[str, int]],
              sizes=SIZES) -> list[GalleryRow]:
    """`embed(samples) -> features`; every protocol at every size."""
    rows = []
    for name in tqdm(protocols, desc="refine-auto study"):
        ds = load_dataset(name, split)
        rows += study_protocol(ds, embed(ds.query), embed(ds.gallery), refiner, modes, sizes)
    return rows


def markdown(rows: list[GalleryRow], modes: list[str], auto_mode: str, threshold: float) -> str:
    head = "| protocol | identities | images | per identity | neighbour_excess | " + " | ".join(
        f"{m} mAP" for m in modes) + " | auto |"
    lines = [head, "|" + "---|" * (6 + len(modes))]
    for r in rows:
        cells = [f"{r.map['none']:.1f}"] + [f"{r.map[m]:.1f} ({r.gain(m):+.1f})" for m in modes[1:]]
        auto = "none (too small)" if r.gallery < MIN_ITEMS else auto_mode if r.excess >= threshold else "none"
        lines.append(f"| {r.protocol} | {r.identities} | {r.gallery} | {r.images_per_identity:g} | "
                     f"{r.excess:+.2f} | " + " | ".join(cells) + f" | {auto} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[GalleryRow], modes: list[str], threshold: float, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, marker in zip(modes[1:], "os^"):
        ax.scatter([r.excess for r in rows], [r.gain(mode) for r in rows], marker=marker, label=mode, alpha=0.8)
    for r in rows:
        ax.annotate(f"{r.protocol.split('/')[0]} {r.identities}", (r.excess, r.gain(modes[-1])), fontsize=6,
                    alpha=0.6)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(threshold, color="red", ls="--", lw=1, label=f"auto threshold {threshold:g}")
    ax.set_xlabel("neighbour_excess (label-free, per gallery)")
    ax.set_ylabel("mAP gain over none (points)")
    ax.legend(fontsize=8)
    ax.set_title("Where refinement pays")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save(rows: list[GalleryRow], path: str | Path, **extra) -> None:
    Path(path).write_text(json.dumps({**extra, "rows": [asdict(r) for r in rows]}, indent=2))
