"""Is a gallery multi-shot? A label-free statistic behind ``refine=auto``.

Refinement (NFormer, k-reciprocal re-ranking) pays when the gallery holds several mutually close images of
a person (a track, several shots per camera): a query's neighbours then include its other true matches.
When each person appears once, a feature's neighbours are strangers and refinement blurs it into them
(README, "NFormer refinement"). Real galleries rarely carry person labels, so the decision is made from
the features alone:

- the *background*: cosine similarity of random pairs of gallery items, almost all strangers; robust
  centre (median) and scale (MAD), so a few percent of same-person pairs do not move it;
- each sampled item's `RANK`-th nearest neighbour in the whole gallery, in background units (z): the 3rd,
  because refinement needs several true neighbours; one twin (two views of a person, CUHK01) does not
  help it, and the 1st neighbour would call such a gallery multi-shot;
- in a gallery where every item is a stranger to every other, that neighbour is the k-th largest of n - 1
  background draws, whose median z for Gaussian draws is `stranger_kth_z` (it grows like sqrt(2 ln n), so
  the statistic drifts less with the gallery's size).

``neighbour_excess`` = median k-th-neighbour z - stranger_kth_z: about 0 or below when items are alone or
in pairs, clearly positive when they have several near twins. Measured per protocol in docs/refine-auto.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass
import math
from statistics import NormalDist
from typing import Callable

import numpy as np

#: how many items are looked at; their neighbours are searched in the whole gallery. The median over 500
#: has a standard error near 0.06 against a threshold margin of 0.1-0.2 (docs/refine-auto.md)
DEFAULT_SAMPLE = 500
RANK = 3  # which neighbour: the 3rd nearest other item
MIN_ITEMS = 100  # below this the statistic is noise (single-shot sets of 30 read up to +0.45): not refined


def _poisson_cdf(k: int, lam: float) -> float:
    term = total = math.exp(-lam)
    for i in range(1, k + 1):
        term *= lam / i
        total += term
    return total


def stranger_kth_z(n: int, k: int = 1) -> float:
    """Median of the k-th largest of n standard normal draws. It exceeds x when at least k draws do: with
    lam = n (1 - Phi(x)) expected exceedances (Poisson), solve P(Poisson(lam) <= k - 1) = 1/2 for lam."""
    if n < k:
        return 0.0
    lo, hi = 0.0, float(k + 1)
    for _ in range(60):  # bisection: the CDF falls as lam grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _poisson_cdf(k - 1, mid) > 0.5 else (lo, mid)
    return NormalDist().inv_cdf(1.0 - min((lo + hi) / 2 / n, 0.5))


@dataclass(frozen=True)
class GalleryProfile:
    items: int  # gallery size when profiled
    sampled: int  # items whose nearest neighbour was looked at
    background_median: float  # cosine of random pairs
    background_scale: float  # 1.4826 x MAD of the same
    neighbour_z: float  # median z of the sampled items' RANK-th nearest neighbours
    stranger_z: float  # stranger_kth_z(items - 1, RANK)

    @property
    def neighbour_excess(self) -> float:
        return self.neighbour_z - self.stranger_z

    def to_dict(self) -> dict:
        return {**asdict(self), "neighbour_excess": self.neighbour_excess}


def profile_gallery(sample: np.ndarray, items: int,
                    kth_other: Callable[[np.ndarray, int], np.ndarray] | None = None) -> GalleryProfile:
    """Profile a gallery of ``items`` L2-normalised vectors from ``sample`` (a uniform sample of them, or all).

    ``kth_other(vectors, k)`` gives each vector's k-th largest cosine to *other* gallery items (the service
    searches its index for the top k + 1 and drops the item itself); without it the sample must be the whole
    gallery and the search is one matrix product."""
    sample = np.asarray(sample, np.float32)
    if len(sample) < 2:
        raise ValueError("a gallery profile needs at least 2 items")
    sims = sample @ sample.T
    pairs = sims[np.triu_indices(len(sample), 1)]
    median = float(np.median(pairs))
    scale = float(1.4826 * np.median(np.abs(pairs - median))) or 1e-6
    k = min(RANK, items - 1)
    if kth_other is None:
        if len(sample) != items:
            raise ValueError("without kth_other the sample must be the whole gallery")
        np.fill_diagonal(sims, -np.inf)
        neighbour = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    else:
        neighbour = np.asarray(kth_other(sample, k), np.float64)
    z = float(np.median((neighbour - median) / scale))
    return GalleryProfile(items, len(sample), median, scale, z, stranger_kth_z(items - 1, k))


def choose_refine(profile: GalleryProfile | None, threshold: float, mode: str) -> str:
    """``mode`` for a multi-shot gallery (excess at or above ``threshold``), else ``none``."""
    if profile is None or profile.items < MIN_ITEMS:
        return "none"
    return mode if profile.neighbour_excess >= threshold else "none"
