"""`make demo` / `reid demo`: start the service on embedded defaults (its own redis-server, the bundled
model), ingest a sample gallery, run a query, print the ranked answer (its true match marked, or where it
ranks beyond the top 10), the gallery's rank-1 and mAP over all its queries (scripts/demo_quality.py), and the
page's URL."""

from __future__ import annotations

from pathlib import Path

from models.data.datasets import ReIDDataset, load_dataset, market1501, shared_data_dir
from service.client import ReidClient, SearchAnswer, ServiceError, metadata_for_samples

from scripts.demo_quality import gallery_quality, match_mark, true_match_rank
from scripts.local_service import local_service

GALLERY = "demo"


def demo_dataset(data_dir: Path) -> ReIDDataset:
    """PRID2011 split 0 (100 probes, 649 gallery) from the shared data, else a synthetic set."""
    if shared_data_dir() is not None:
        return load_dataset("prid2011", 0)
    from models.synthetic import make_synthetic

    root = data_dir / "synthetic"
    if not (root / "query").is_dir():
        print(f"../shared/data not found: generating a synthetic dataset in {root}")
        make_synthetic(root, n_train_ids=10, n_test_ids=60, seed=0)
    return market1501(root)


def format_results(answer: SearchAnswer, truth: str | None = None, camera: str | None = None) -> str:
    """The ranked table; given the query's person (``truth``) and camera, its true matches are marked."""
    lines = [f"{'rank':>4}  {'score':>6}  {'camera':>6}  {'person':>6}  external_id"]
    for rank, r in enumerate(answer.results, 1):
        mark = match_mark(r, truth, camera) if truth is not None else ""
        lines.append(f"{rank:>4}  {r.score:6.3f}  {str(r.camera_id):>6}  {str(r.person_id):>6}  "
                     f"{r.external_id}{mark}")
    timing = ", ".join(f"{k} {v:.1f} ms" for k, v in answer.timing_ms.items())
    lines.append(f"model {answer.model}; {timing}")
    return "\n".join(lines)


def forget_other_models_gallery(client: ReidClient, model_id: str) -> None:
    """The demo's gallery from an earlier run under another default model (an upgrade): its vectors cannot be
    compared with this model's queries, and it is only the sample, so it is deleted and ingested again."""
    try:
        held = client.gallery(GALLERY).model
    except ServiceError as e:
        if e.status == 404:
            return
        raise
    if held and held != model_id:
        print(f"gallery {GALLERY!r} holds vectors of model {held} from an earlier run; this one serves {model_id}: "
              "ingesting it again")
        client.delete_gallery(GALLERY)


def run_demo(port: int = 8000, once: bool = False, data_dir: str | Path = "data/demo") -> int:
    data_dir = Path(data_dir).resolve()
    dataset = demo_dataset(data_dir)
    try:
        with local_service(data_dir / "service", port) as (url, server), ReidClient(url) as client:
            client.wait_live(timeout=180, process=server)
            card = client.model()
            forget_other_models_gallery(client, f"{card.name}:{card.version}")
            client.wait_ready(timeout=180, process=server)
            print(f"service ready at {url} with model {card.name} {card.version}")
            result = client.ingest(GALLERY, [s.path for s in dataset.gallery], metadata_for_samples(dataset.gallery),
                                   progress=True)
            print(f"gallery {GALLERY!r}: {client.gallery(GALLERY).count} images "
                  f"({len(result.errors)} rejected) from {dataset.name}")
            stored = [(item.id, dataset.gallery[item.index]) for item in result.items]
            quality, answers = gallery_quality(client, GALLERY, dataset.query, stored)
            query, person, camera = dataset.query[0], str(dataset.query[0].pid), str(dataset.query[0].camid)
            answer = client.search(GALLERY, query.path, top_k=10)
            print(f"\nquery {Path(query.path).name} (person {person}, camera {camera}); top 10:")
            print(format_results(answer, truth=person, camera=camera))
            rank = true_match_rank(answers[0], person, camera)
            if rank is None:
                print(f"its true match (person {person} from another camera) is not among the {quality.ranked} "
                      "images ranked")
            elif rank > 10:
                print(f"its true match (person {person} from another camera) is at rank {rank}, beyond the top 10")
            print(f"\ndemo gallery quality {quality.summary(len(dataset.query))}")
            print(f"\nOpen {url}/ for the web page, {url}/docs for the API.")
            if once:
                return 0
            print("Serving until interrupted (Ctrl-C).")
            server.wait()
            return server.returncode or 0
    except KeyboardInterrupt:
        return 0
