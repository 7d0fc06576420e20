"""What storing vectors as float16 (REID_STORE_DTYPE=float16) costs in accuracy, on the shipped model.

    python -m bench.store_dtype                              # CUHK03, PRID450S, PRID2011 split 0
    python -m bench.store_dtype --data cuhk03 --splits 0 1 --json out.json

The service keeps each gallery image's vector in Redis and builds its FAISS index (float32 in memory) from what
Redis holds, so with float16 storage the *gallery* features are rounded through float16 while the query's are
computed afresh in float32. This embeds each protocol once with the bundle's encoder (as ``reid evaluate``
does) and scores, per refine mode, the gallery as float32 and as float16-rounded, with the serving refiner
(:class:`index.refine.Refiner` over the bundle's int8 NFormer, as REID_REFINE_PRECISION=int8 serves it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from index.metrics import RetrievalMetrics, evaluate_rankings
from index.vector_codec import VectorCodec

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "service" / "default_bundle"
DEFAULT_DATA = ("cuhk03", "prid450s", "prid2011")
#: refine modes measured: cosine alone, and the NFormer over the query and its K = 200 FAISS candidates
MODES = (("none", 0), ("local", 200))


def stored(gallery: np.ndarray, dtype: str) -> np.ndarray:
    """The gallery features as the store gives them back: encoded with ``dtype``, decoded to float32."""
    codec = VectorCodec.named(dtype)
    return codec.decode(codec.encode(gallery), gallery.shape[1])


def score_modes(refiner, dataset, query: np.ndarray, gallery: np.ndarray) -> dict[str, RetrievalMetrics]:
    ids = ([s.pid for s in dataset.query], [s.pid for s in dataset.gallery], [s.camid for s in dataset.query],
           [s.camid for s in dataset.gallery])
    out = {}
    for mode, k in MODES:
        scores = refiner.with_candidates(k or refiner.candidates).similarities(mode, query, gallery)
        out[f"{mode}@{k}" if k else mode] = evaluate_rankings(-scores, *ids)
    return out


def measure(model_dir: Path, data: list[str], splits: list[int], threads: int = 1) -> dict:
    from models.data.datasets import load_dataset
    from models.evaluate import BundleEncoder, embed_protocol
    from models.refine_eval import bundle_refiner

    encoder = BundleEncoder(model_dir, threads=threads)
    refiner = bundle_refiner(model_dir, threads=threads, precision="int8")
    report: dict = {}
    for name in data:
        for split in splits:
            dataset = load_dataset(name, split)
            q, g = embed_protocol(encoder, dataset)
            rows = {}
            for dtype in ("float32", "float16"):
                for label, m in score_modes(refiner, dataset, q, stored(g, dtype)).items():
                    rows.setdefault(label, {})[dtype] = {"mAP": m.mAP, "rank1": m.ranks["rank1"]}
            g16 = stored(g, "float16")
            cosine = np.sum(g16 * g, 1) / (np.linalg.norm(g16, axis=1) * np.linalg.norm(g, axis=1))
            report[dataset.name] = {"modes": rows, "max_abs_rounding_error": float(np.abs(g16 - g).max()),
                                    "min_cosine_to_float32": float(cosine.min())}
    return report


def markdown(report: dict) -> str:
    lines = ["| protocol | refine | mAP float32 | mAP float16 | change (points) | rank-1 float32 | rank-1 float16 |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report.items():
        for label, by in r["modes"].items():
            a, b = by["float32"], by["float16"]
            lines.append(f"| {name} | {label} | {100 * a['mAP']:.2f} | {100 * b['mAP']:.2f} | "
                         f"{100 * (b['mAP'] - a['mAP']):+.3f} | {100 * a['rank1']:.2f} | {100 * b['rank1']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--data", nargs="+", default=list(DEFAULT_DATA))
    p.add_argument("--splits", nargs="+", type=int, default=[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    report = measure(args.model_dir, args.data, args.splits, args.threads)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
