"""CMC of every refine mode on the shared protocol (PRID450S split 0), through the same machinery as
`reid evaluate --refine` (`models.refine_eval.evaluate_modes` over the bundle's serving refiner)."""

from __future__ import annotations

from pathlib import Path

from index.bundle import ENCODER_FILE, NFORMER_FILE
from models.refine_eval import bundle_refiner, evaluate_modes
from service.settings import RefineMode

from . import data
from .features import protocol_features


def run(bundle_dir: Path, cfg) -> dict:
    """``cfg``: refine_modes, candidates (K list of local and local_kreciprocal), kreciprocal_candidates.
    Returns JSON figures plus ``_metrics`` (RetrievalMetrics per mode, for the plot; dropped from the JSON)."""
    dataset = data.protocol(data.PROTOCOL)
    if dataset is None:
        return {"skipped": f"{data.PROTOCOL} not in the shared data (../shared/data or $REID_SHARED_DATA)"}
    card = data.card(bundle_dir)
    q, g = protocol_features(bundle_dir / ENCODER_FILE, card, dataset)
    refiner = bundle_refiner(bundle_dir)  # what serves: the int8 NFormer when the bundle ships one
    modes = [m for m in cfg.refine_modes if not RefineMode(m).needs_nformer or refiner.nformer is not None]
    metrics = evaluate_modes(refiner, dataset, q, g, modes, cfg.candidates, cfg.kreciprocal_candidates)
    if refiner.nformer is not None and refiner.nformer.path.name != NFORMER_FILE:
        fp32 = evaluate_modes(bundle_refiner(bundle_dir, precision="fp32"), dataset, q, g, ("joint", "local"),
                              (cfg.local_goal_k,), ())
        metrics.update({f"{label} (fp32)": m for label, m in fp32.items()})
    return {"protocol": dataset.name, "queries": len(q), "gallery": len(g),
            "nformer": refiner.nformer.path.name if refiner.nformer is not None else None,
            "modes": {label: {"rank1": m.ranks["rank1"], "rank5": m.ranks["rank5"], "mAP": m.mAP}
                      for label, m in metrics.items()},
            "_metrics": metrics}
