"""Is a gallery multi-shot? A label-free statistic behind ``refine=auto``.

Refinement (NFormer, k-reciprocal re-ranking) pays when the gallery holds several mutually close images of
a person (a track, several shots per camera): a query's neighbours then include its other true matches.
When each person appears once, a feature's neighbours are strangers and refinement blurs it into them
(README, "NFormer refinement"). Real galleries rarely carry person labels, so the decision is made from
the features alone:

- the *background*: cosine similarity of random pairs of gallery items, almost all strangers; robust
  centre (median) and scale (MAD), so a few percent of same-person pairs do not move it;
- each sampled item's *nearest neighbour* in the whole gallery, in background units (z);
- in a gallery where every item is a stranger to every other, an item's nearest neighbour is the largest of
  n - 1 background draws, whose median z is Phi^-1(2^(-1/(n-1))) for Gaussian draws (`stranger_nearest_z`;
  it grows like sqrt(2 ln n), so the statistic does not drift with the gallery's size).

``neighbour_excess`` = median nearest-neighbour z - stranger_nearest_z: about 0 or below when items are
alone, clearly positive when they have near twins. Measured per protocol in docs/refine-auto.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Callable

import numpy as np

#: how many items are looked at; their nearest neighbours are searched in the whole gallery
DEFAULT_SAMPLE = 2000
MIN_ITEMS = 20  # below this the statistic is noise: auto does not refine


def stranger_nearest_z(n: int) -> float:
    """Median of the largest of n standard normal draws: P(max <= x) = Phi(x)^n = 1/2."""
    return NormalDist().inv_cdf(0.5 ** (1.0 / n)) if n >= 1 else 0.0


@dataclass(frozen=True)
class GalleryProfile:
    items: int  # gallery size when profiled
    sampled: int  # items whose nearest neighbour was looked at
    background_median: float  # cosine of random pairs
    background_scale: float  # 1.4826 x MAD of the same
    nearest_z: float  # median z of the sampled items' nearest neighbours
    stranger_z: float  # stranger_nearest_z(items - 1)

    @property
    def neighbour_excess(self) -> float:
        return self.nearest_z - self.stranger_z

    def to_dict(self) -> dict:
        return {**asdict(self), "neighbour_excess": self.neighbour_excess}


def profile_gallery(sample: np.ndarray, items: int,
                    nearest_other: Callable[[np.ndarray], np.ndarray] | None = None) -> GalleryProfile:
    """Profile a gallery of ``items`` L2-normalised vectors from ``sample`` (a uniform sample of them, or all).

    ``nearest_other(vectors)`` gives each vector's largest cosine to *another* gallery item (the service
    searches its index for the top 2 and drops the item itself); without it the sample must be the whole
    gallery and the search is one matrix product."""
    sample = np.asarray(sample, np.float32)
    if len(sample) < 2:
        raise ValueError("a gallery profile needs at least 2 items")
    sims = sample @ sample.T
    pairs = sims[np.triu_indices(len(sample), 1)]
    median = float(np.median(pairs))
    scale = float(1.4826 * np.median(np.abs(pairs - median))) or 1e-6
    if nearest_other is None:
        if len(sample) != items:
            raise ValueError("without nearest_other the sample must be the whole gallery")
        np.fill_diagonal(sims, -np.inf)
        nearest = sims.max(axis=1)
    else:
        nearest = np.asarray(nearest_other(sample), np.float64)
    z = float(np.median((nearest - median) / scale))
    return GalleryProfile(items, len(sample), median, scale, z, stranger_nearest_z(items - 1))


def choose_refine(profile: GalleryProfile | None, threshold: float, mode: str) -> str:
    """``mode`` for a multi-shot gallery (excess at or above ``threshold``), else ``none``."""
    if profile is None or profile.items < MIN_ITEMS:
        return "none"
    return mode if profile.neighbour_excess >= threshold else "none"
