"""Synthetic galleries of any size that follow the real feature distribution, for the scale benchmark.

Source: the encoder's features of real person images with their identity and camera labels (by default the
3,362 query + gallery images of CUHK03 split 0's 350 test identities, which the default bundle never trained
on; multi-shot: two cameras, up to five images each). The fit splits every real feature into

    feature = identity centre + view offset (the camera's mean minus the centre) + image residual

and keeps the parts themselves (no Gaussian is fitted to them: real residuals are far from Gaussian, a fitted
covariance made same-person cosines too concentrated). Each synthetic person:

* centre: ``w c_a + (1 - w) c_b`` for two random real identities ``a``, ``b`` and ``w ~ U(0, 1)``, plus
  ``JITTER`` x a draw from the (shrunk) covariance of the real centres, rescaled to ``|c_a|``: centres fill
  the space between real people instead of repeating 350 of them a million times;
* two views, ``+v`` and ``-v``: a real view offset direction (``cos t u1 + sin t u2`` of two random real
  ones, which keeps their second moments and never repeats one exactly) at ``a``'s own offset scale; the
  sign pair mirrors the real data, where a person's two camera means sit on either side of its centre;
* five images per view: real residual directions mixed the same way, centred within the view as real ones
  are, at ``a``'s own residual scale (spread people have short centres: keeping scale and centre of one
  parent together keeps that link), then L2-normalised.

Vector ``i`` belongs to person ``i // 10``. Everything is drawn chunk by chunk (``CHUNK_PERSONS`` persons,
seeded by ``(seed, stream, chunk)``), so any chunk can be regenerated alone and N is only bounded by disk.
Queries are new images (other noise) of random gallery persons, from their own stream.

:func:`resemblance` compares a synthetic set shaped like the real one (as many persons) with the real
features: same-person, different-person and nearest-neighbour cosines, rank-1 identity of the nearest
neighbour, and the variance share of the top principal directions. What no sample of 3,362 images can
check is how densely people pack at 10M; the benchmark reports the exact top-10 cosines at full size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VIEWS, PER_VIEW = 2, 5
PER_PERSON = VIEWS * PER_VIEW
CHUNK_PERSONS = 6_400  #: 64,000 vectors per chunk: ~65 MB per float32 temporary
JITTER = 0.3  #: share of the real centres' spread added to each mixed centre
SOURCE = "cuhk03"  #: multi-shot (two views, several images each): the within-view residuals need that
_STREAM_PERSONS, _STREAM_IMAGES, _STREAM_QUERIES = 0, 1, 2


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


class FeatureGenerator:
    """Fitted to real ``features`` (L2-normalised) with identity ``pids`` and camera ``cams``."""

    def __init__(self, features: np.ndarray, pids, cams, seed: int = 0):
        x = _unit(np.asarray(features, np.float64)).astype(np.float64)
        _, inv = np.unique(np.asarray(pids), return_inverse=True)
        _, vinv = np.unique(inv * 1_000_003 + np.asarray(cams), return_inverse=True)
        n_ids, n_views = inv.max() + 1, vinv.max() + 1
        cnt = np.bincount(vinv, minlength=n_views)
        vpid = np.zeros(n_views, np.int64)
        vpid[vinv] = inv
        centres = np.stack([x[inv == i].mean(0) for i in range(n_ids)])
        view_mean = np.stack([x[vinv == v].mean(0) for v in range(n_views)])
        view_off, img_res = view_mean - centres[vpid], x - view_mean[vinv]
        multi_view = np.bincount(vpid, minlength=n_ids) >= 2
        multi_img = cnt[vinv] >= 2
        # per identity: rms view offset (over its views) and rms image residual (over images in shared views)
        id_vo = np.sqrt(np.bincount(vpid, (view_off ** 2).sum(1), n_ids) / np.bincount(vpid, minlength=n_ids))
        res2 = np.bincount(inv, (img_res ** 2).sum(1) * multi_img, n_ids)
        with np.errstate(invalid="ignore", divide="ignore"):
            id_ir = np.sqrt(res2 / np.bincount(inv, multi_img, n_ids))
        ok = multi_view & np.isfinite(id_ir) & (id_ir > 0) & (id_vo > 0)
        if ok.sum() < 2:
            raise ValueError("the real features need identities seen in 2+ cameras with 2+ images in a camera")
        use_v, use_i = ok[vpid], ok[inv] & multi_img
        self.vo_dir = (view_off[use_v] / id_vo[vpid[use_v], None]).astype(np.float32)
        self.ir_dir = (img_res[use_i] / id_ir[inv[use_i], None]).astype(np.float32)
        self.parents = np.flatnonzero(ok)
        self.centres = centres.astype(np.float32)
        self.centre_norm = np.linalg.norm(centres, axis=1).astype(np.float32)
        self.id_vo, self.id_ir = id_vo.astype(np.float32), np.nan_to_num(id_ir).astype(np.float32)
        cov = np.cov(centres, rowvar=False)
        cov += 0.1 * np.trace(cov) / len(cov) * np.eye(len(cov))  # fewer identities than dimensions
        self.centre_chol = np.linalg.cholesky(cov).astype(np.float32)
        # a new image of a view deviates from the view's true mean by more than real residuals do from their
        # own view's sample mean (which sits closer to them): the usual n / (n - 1)
        per_view = cnt[cnt >= 2].mean()
        self.query_scale = float(np.sqrt(per_view / (per_view - 1)))
        self.dim, self.seed = x.shape[1], int(seed)
        self.real = {"images": len(x), "identities": int(n_ids), "views": int(n_views),
                     "parents": int(ok.sum()), "images_per_view": round(float(cnt.mean()), 2)}

    # ------------------------------------------------------------------ sizes
    @staticmethod
    def n_chunks(n: int) -> int:
        return -(-n // (CHUNK_PERSONS * PER_PERSON))

    @staticmethod
    def chunk_rows(c: int, n: int) -> tuple[int, int]:
        size = CHUNK_PERSONS * PER_PERSON
        return c * size, min(n, (c + 1) * size)

    # ------------------------------------------------------------------ drawing
    def _rng(self, stream: int, c: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, c])

    @staticmethod
    def _mix(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
        """``cos t u1 + sin t u2`` of two random pool rows: same second moments as the pool, no repeats. One
        draw per row, row by row, so that the first rows do not depend on ``n`` (a short last chunk)."""
        u = rng.random((n, 3))
        t = (2 * np.pi * u[:, :1]).astype(np.float32)
        a, b = (np.minimum(u[:, 1:].T * len(pool), len(pool) - 1)).astype(np.int64)
        return np.cos(t) * pool[a] + np.sin(t) * pool[b]

    def persons(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Chunk ``c``'s persons: centres [P, D], view offsets [P, D] (views are +v and -v), residual scales [P]."""
        rng, p = self._rng(_STREAM_PERSONS, c), CHUNK_PERSONS
        a, b = self.parents[rng.integers(0, len(self.parents), (2, p))]
        w = rng.uniform(0, 1, (p, 1)).astype(np.float32)
        m = w * self.centres[a] + (1 - w) * self.centres[b]
        m += JITTER * rng.standard_normal((p, self.dim), np.float32) @ self.centre_chol.T
        m *= (self.centre_norm[a] / np.linalg.norm(m, axis=1))[:, None]
        vo = self._mix(rng, self.vo_dir, p) * self.id_vo[a, None]
        return m, vo, self.id_ir[a]

    def chunk(self, c: int, n: int) -> np.ndarray:
        """Rows ``chunk_rows(c, n)`` of the gallery: float32 [rows, D], L2-normalised."""
        start, stop = self.chunk_rows(c, n)
        m, vo, scale = self.persons(c)
        p = -(-(stop - start) // PER_PERSON)  # only the persons needed: the same rows whatever n
        r = self._mix(self._rng(_STREAM_IMAGES, c), self.ir_dir, p * PER_PERSON).reshape(p, VIEWS, PER_VIEW, self.dim)
        r -= r.mean(2, keepdims=True)  # real residuals sum to zero within their view
        r *= np.float32(np.sqrt(PER_VIEW / (PER_VIEW - 1))) * scale[:p, None, None, None]
        r += m[:p, None, None] + np.stack([vo[:p], -vo[:p]], 1)[:, :, None]
        return _unit(r.reshape(-1, self.dim)[:stop - start])

    def queries(self, count: int, n: int, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``count`` new images of random persons of an ``n``-vector gallery, and those persons' numbers."""
        rng = self._rng(_STREAM_QUERIES, stream)
        persons = np.sort(rng.integers(0, -(-n // PER_PERSON), count))
        sides = rng.choice(np.array([-1, 1], np.float32), count)
        noise = self._mix(rng, self.ir_dir, count)
        out = np.empty((count, self.dim), np.float32)
        for c in np.unique(persons // CHUNK_PERSONS):
            rows = np.flatnonzero(persons // CHUNK_PERSONS == c)
            m, vo, scale = self.persons(int(c))
            local = persons[rows] % CHUNK_PERSONS
            out[rows] = (m[local] + sides[rows, None] * vo[local]
                         + self.query_scale * scale[local, None] * noise[rows])
        order = rng.permutation(count)  # not grouped by person number
        return _unit(out)[order], persons[order]


# ---------------------------------------------------------------------- real features and resemblance
def real_features(bundle_dir: Path, name: str = SOURCE) -> tuple[np.ndarray, np.ndarray, np.ndarray, str] | None:
    """The bundle's features of the test identities of ``name`` split 0 (query + gallery), pids, cameras."""
    from index.bundle import ENCODER_FILE

    from . import data
    from .features import protocol_features

    dataset = data.protocol(name)
    if dataset is None:
        return None
    q, g = protocol_features(Path(bundle_dir) / ENCODER_FILE, data.card(bundle_dir), dataset)
    samples = dataset.query + dataset.gallery
    return (np.concatenate([q, g]), np.array([s.pid for s in samples]), np.array([s.camid for s in samples]),
            f"{len(samples):,} {dataset.name} test images (query + gallery), "
            f"{len({s.pid for s in samples})} identities unseen in training")


def _quantiles(a: np.ndarray) -> dict:
    return {f"p{q}": round(float(np.percentile(a, q)), 3) for q in (5, 50, 95)}


def describe(v: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> dict:
    """Cosine statistics of unit vectors ``v`` with identity ``labels`` (a few thousand rows)."""
    s = v @ v.T
    same = labels[:, None] == labels[None, :]
    iu = np.triu_indices(len(v), 1)
    between = s[iu][~same[iu]]
    np.fill_diagonal(s, -np.inf)
    ev = np.linalg.eigvalsh(np.cov(v, rowvar=False))[::-1]
    return {"same_person_cosine": _quantiles(s[iu][same[iu]]),
            "different_person_cosine": _quantiles(rng.choice(between, min(len(between), 200_000), replace=False)),
            "nearest_neighbour_cosine": _quantiles(s.max(1)),
            "nearest_neighbour_same_person": round(float(same[np.arange(len(v)), s.argmax(1)].mean()), 3),
            "variance_top10_directions": round(float(ev[:10].sum() / ev.sum()), 3),
            "variance_top64_directions": round(float(ev[:64].sum() / ev.sum()), 3)}


def resemblance(gen: FeatureGenerator, features: np.ndarray, pids) -> dict:
    """Real features against a synthetic set with as many persons (the first rows of the gallery stream)."""
    rng = np.random.default_rng(0)
    persons = len(np.unique(pids))
    n = persons * PER_PERSON
    synth = np.concatenate([gen.chunk(c, n) for c in range(gen.n_chunks(n))])
    return {"real": describe(_unit(features), np.asarray(pids), rng),
            "synthetic": describe(synth, np.arange(n) // PER_PERSON, rng),
            "synthetic_persons": persons}
