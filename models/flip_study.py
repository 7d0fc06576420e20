"""Which side of a search gains from flip averaging: an encoder checkpoint's protocols evaluated three ways.

- `none`: one encoder run per image, queries and gallery alike;
- `query`: queries flip-averaged (the mean of the image's and its mirror image's embeddings), gallery plain:
  what a bundle with `query_flip` serves (two encoder runs per query, ingest unchanged);
- `both`: every image flip-averaged: the `flip_average` graph (ingest at half the speed).

Issue 14 chose `query_flip` with this table on split 1 (`reid flip-study --split 1`)."""

from __future__ import annotations

from pathlib import Path

from index.metrics import RetrievalMetrics, evaluate_features

from .data.datasets import load_dataset
from .features import extract_features
from .reid_model import NormalizedEncoder
from .train import load_trained_model

SIDES = ("none", "query", "both")


def flip_study(checkpoint: str | Path, data: list[str], split: int) -> dict[str, dict[str, RetrievalMetrics]]:
    """Protocol name -> side -> metrics."""
    model, spec, _ = load_trained_model(checkpoint)
    plain, flipped = NormalizedEncoder(model).eval(), NormalizedEncoder(model, flip_average=True).eval()
    results = {}
    for name in data:
        dataset = load_dataset(name, split)
        features = {(side, encoder_name): extract_features(encoder, samples, spec, desc=f"{dataset.name} {side}")
                    for encoder_name, encoder in (("plain", plain), ("flipped", flipped))
                    for side, samples in (("query", dataset.query), ("gallery", dataset.gallery))}
        labels = ([s.pid for s in dataset.query], [s.pid for s in dataset.gallery],
                  [s.camid for s in dataset.query], [s.camid for s in dataset.gallery])
        pairs = {"none": ("plain", "plain"), "query": ("flipped", "plain"), "both": ("flipped", "flipped")}
        results[dataset.name] = {side: evaluate_features(features[("query", q)], features[("gallery", g)], *labels)
                                 for side, (q, g) in pairs.items()}
    return results


def study_markdown(results_by_model: dict[str, dict[str, dict[str, RetrievalMetrics]]]) -> str:
    """One row per model and side: rank-1 / mAP per protocol, and the mean mAP change against `none`."""
    protocols = list(next(iter(results_by_model.values())))
    lines = ["| model | side flip-averaged | " + " | ".join(f"{p} R1 / mAP" for p in protocols)
             + " | mean mAP vs none |", "|---" * (len(protocols) + 3) + "|"]
    for model, results in results_by_model.items():
        base = sum(results[p]["none"].mAP for p in protocols) / len(protocols)
        for side in SIDES:
            cells = [f"{100 * results[p][side].ranks['rank1']:.1f} / {100 * results[p][side].mAP:.1f}"
                     for p in protocols]
            mean = sum(results[p][side].mAP for p in protocols) / len(protocols)
            lines.append(f"| {model} | {side} | " + " | ".join(cells) + f" | {100 * (mean - base):+.2f} |")
    return "\n".join(lines) + "\n"
