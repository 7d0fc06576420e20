"""Same-person decisions: a cosine threshold calibrated on a gallery's labeled images.

Pairs of labeled images taken by *different* cameras (the cross-camera question ReID answers) are
genuine when both carry the same ``person_id`` and impostor otherwise; large galleries are sampled
(``calibrate_max_images`` images, ``calibrate_max_pairs`` impostor pairs, fixed seed). A pair is called
the same person when its cosine is *above* the threshold; the threshold is the one whose impostor pass
rate (FPR) is at most the target. A target needs at least ``ceil(1 / target_fpr)`` impostor pairs (1,000 for
the default 1e-3): with fewer, the smallest non-zero FPR the pairs can measure, 1 / pairs, is above the target,
so the "threshold at the target" is only the highest impostor score seen and says nothing about the target's
rate; that is refused (``too_few_impostor_pairs``) rather than kept. The calibration (threshold, target FPR,
TPR at FPR 1e-2 and 1e-3, a coarse ROC) is kept in Redis in the gallery's settings hash, so every replica and
restart uses it, and it goes with the gallery. Searches then mark each result ``match`` by its plain encoder
``cosine`` (the score that was calibrated: refined scores are on other scales).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

FIELD = "calibration"
ROC_FPRS = (1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.5, 1.0)


class CalibrationError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def labeled_vectors(store, gallery: str, limit: int, seed: int = 0
                    ) -> tuple[np.ndarray, list[str], list[str | None], np.ndarray]:
    """(ids, person labels, cameras, vectors) of the gallery's images with a ``person_id``, sampled to
    ``limit`` (fixed seed)."""
    rows = [(i, m["person_id"], m.get("camera_id")) for batch in store.iter_image_meta(
        gallery, ("person_id", "camera_id")) for i, m in batch if m.get("person_id")]
    rows.sort()
    if len(rows) > limit:
        pick = np.random.default_rng(seed).choice(len(rows), limit, replace=False)
        rows = [rows[i] for i in sorted(pick)]
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    vecs = store.get_vectors(gallery, ids.tolist())
    keep = [k for k, v in enumerate(vecs) if v is not None]  # deleted meanwhile
    ids = ids[keep]
    mat = np.stack([vecs[k] for k in keep]).astype(np.float32) if keep else np.zeros((0, 0), np.float32)
    if len(mat):
        mat /= np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)
    return ids, [rows[k][1] for k in keep], [rows[k][2] for k in keep], mat


def threshold_at(impostors: np.ndarray, fpr: float) -> float:
    """The smallest threshold t with mean(impostors > t) <= fpr."""
    desc = np.sort(impostors)[::-1]
    k = int(np.floor(fpr * len(desc)))
    if k >= len(desc):
        return float(desc[-1]) - 1e-6
    return float(desc[k])


def impostor_pairs_needed(target_fpr: float) -> int:
    """Impostor pairs that can measure an FPR of ``target_fpr``: one of them above the threshold is the target."""
    return math.ceil(1.0 / target_fpr - 1e-9)  # 1 / (1/12) is 12.000000000000002, and 12 pairs do measure 1/12


def _check_measurable(pairs: int, max_pairs: int, target_fpr: float) -> None:
    need = impostor_pairs_needed(target_fpr)
    kept = min(pairs, max_pairs)
    if kept >= need:
        return
    if pairs >= need:  # the gallery has them, the sample cap keeps fewer
        raise CalibrationError("too_few_impostor_pairs", f"target_fpr {target_fpr:g} needs at least {need} "
                               f"impostor pairs but REID_CALIBRATE_MAX_PAIRS samples {max_pairs} of the {pairs}: "
                               "raise the setting or target_fpr")
    lowest = _round_up(1.0 / pairs)
    instead = f", or ask for target_fpr >= {lowest:g}" if lowest < 1 else ""
    raise CalibrationError("too_few_impostor_pairs", f"{pairs} impostor cross-camera pair(s); target_fpr "
                           f"{target_fpr:g} needs at least {need} (fewer cannot measure a rate that low): label "
                           f"more people seen by different cameras{instead}")


def _round_up(x: float) -> float:
    """``x`` rounded up to two significant digits (a suggested target must not fall below what is measurable)."""
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return round(math.ceil(x / step - 1e-9) * step, 12)


def calibrate(pids: list[str], cams: list[str | None], vecs: np.ndarray, target_fpr: float,
              max_pairs: int, seed: int = 0) -> dict[str, Any]:
    """Genuine/impostor cosine distributions over cross-camera pairs, the ROC and the chosen threshold."""
    n = len(pids)
    if n < 2:
        raise CalibrationError("too_few_labeled_images", f"{n} labeled image(s); calibration needs images with "
                                                         "person_id from at least two cameras")
    p = np.unique(np.asarray(pids), return_inverse=True)[1]
    c = np.unique(np.asarray([x or "" for x in cams]), return_inverse=True)[1]
    sims = vecs @ vecs.T
    iu = np.triu_indices(n, 1)
    cross = c[iu[0]] != c[iu[1]]
    same = p[iu[0]] == p[iu[1]]
    genuine = sims[iu][cross & same]
    impostor = sims[iu][cross & ~same]
    if not len(genuine) or not len(impostor):
        raise CalibrationError("no_pairs", f"{len(genuine)} genuine and {len(impostor)} impostor cross-camera "
                                           "pairs; calibration needs both (label people seen by several cameras)")
    _check_measurable(len(impostor), max_pairs, target_fpr)
    if len(impostor) > max_pairs:
        impostor = np.random.default_rng(seed).choice(impostor, max_pairs, replace=False)

    def tpr_at(fpr: float) -> dict[str, float]:
        t = threshold_at(impostor, fpr)
        return {"fpr": float(np.mean(impostor > t)), "tpr": float(np.mean(genuine > t)), "threshold": t}

    chosen = tpr_at(target_fpr)
    return {
        "threshold": chosen["threshold"], "target_fpr": target_fpr, "fpr": chosen["fpr"], "tpr": chosen["tpr"],
        "tpr_at_fpr_1e-2": tpr_at(1e-2)["tpr"], "tpr_at_fpr_1e-3": tpr_at(1e-3)["tpr"],
        "roc": [tpr_at(f) for f in ROC_FPRS],
        "genuine_pairs": int(len(genuine)), "impostor_pairs": int(len(impostor)), "images": n,
        "identities": int(p.max() + 1),
        "score": "cosine",
        "genuine": _stats(genuine), "impostor": _stats(impostor),
    }


def _stats(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}


def save(store, gallery: str, calib: dict[str, Any]) -> None:
    store.set_gallery_field(gallery, FIELD, json.dumps(calib))


def load(store, gallery: str) -> dict[str, Any] | None:
    raw = store.get_gallery_field(gallery, FIELD)
    return None if raw is None else json.loads(raw)
