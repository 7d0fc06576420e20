"""README "Adapting to new cameras, over HTTP": the product path measured end to end on a labeled target.

1. the target's unlabeled training images become a gallery, each image with only its `camera_id` and
   `external_id` (what a deployment knows); the service keeps their bytes;
2. `POST /v1/galleries/{g}/adapt` fine-tunes the active model on them (GRACL, `reid adapt` in a job; the service
   lays the images out as `<camera>/<id>.<ext>`), and the job's result names the new bundle;
3. the target's test identities are a second gallery, searched over HTTP with every query: rank-1 and mAP by the
   project's evaluator (scripts/demo_quality.py);
4. `POST /v1/models/{bundle}/activate` re-embeds every gallery with the new bundle and serves it;
5. the same searches again.

Labels are used by step 3 only, to score the answers; the service never sees them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from models.data.datasets import ReIDDataset, Sample
from service.client import ReidClient

from scripts.demo_quality import GalleryQuality, gallery_quality

TRAIN_GALLERY, TEST_GALLERY = "target-unlabeled", "target-test"


@dataclass
class Walkthrough:
    images: int  # adaptation images the service stored
    before: GalleryQuality
    after: GalleryQuality
    bundle_id: str
    adapt_s: float
    activate_s: float
    adaptation: dict  # the adaptation job's result

    def summary(self) -> str:
        b, a = self.before.metrics, self.after.metrics
        return (f"adapted on {self.images} unlabeled images in {self.adapt_s / 60:.1f} min, activated "
                f"(re-embedding every gallery) in {self.activate_s:.0f} s as {self.bundle_id}\n"
                f"  before: rank-1 {100 * b.ranks['rank1']:.1f}%, mAP {100 * b.mAP:.1f}%\n"
                f"  after:  rank-1 {100 * a.ranks['rank1']:.1f}%, mAP {100 * a.mAP:.1f}%  "
                f"({self.after.gallery} gallery images, {a.evaluated_queries} queries, refine {self.after.refine})")


def first_identities(samples: Sequence[Sample], n: int | None) -> list[Sample]:
    """The samples of the `n` lowest-numbered identities (all for None): a smaller run of the same protocol."""
    keep = set(sorted({s.pid for s in samples})[:n]) if n else {s.pid for s in samples}
    return [s for s in samples if s.pid in keep]


def smaller_protocol(dataset: ReIDDataset, identities: int | None) -> ReIDDataset:
    """The protocol restricted to its first `identities` test identities (their queries and gallery images;
    gallery distractors, identities no query asks for, stay)."""
    if not identities:
        return dataset
    query = first_identities(dataset.query, identities)
    kept, asked = {s.pid for s in query}, {s.pid for s in dataset.query}
    return replace(dataset, name=f"{dataset.name}/first{identities}", query=query,
                   gallery=[s for s in dataset.gallery if s.pid in kept or s.pid not in asked])


def deployment_metadata(samples: Sequence[Sample]) -> list[dict]:
    """What a deployment knows of an image: its camera and its file name, no identity."""
    return [{"camera_id": f"cam{s.camid}", "external_id": Path(s.path).name} for s in samples]


def finished(client: ReidClient, job_id: str, timeout: float) -> dict:
    job = client.wait_job(job_id, timeout=timeout)
    if job.status != "succeeded":
        raise RuntimeError(f"{job.kind} job {job.id} {job.status}: {job.message}")
    return job.result or {}


def run_walkthrough(client: ReidClient, train: Sequence[Sample], test: ReIDDataset, epochs: int | None = None,
                    timeout: float = 3 * 3600, progress: bool = True, max_top_k: int = 1000) -> Walkthrough:
    """Steps 1-5 of the module docstring against a running service; see there. Each query's answer holds up to
    `max_top_k` images (the service's REID_MAX_TOP_K): the whole test gallery when it is that large."""
    stored_train = client.ingest(TRAIN_GALLERY, [s.path for s in train], deployment_metadata(train), progress=progress)
    result = client.ingest(TEST_GALLERY, [s.path for s in test.gallery], deployment_metadata(test.gallery),
                           progress=progress)
    stored = [(item.id, test.gallery[item.index]) for item in result.items]
    before, _ = gallery_quality(client, TEST_GALLERY, test.query, stored, max_top_k=max_top_k)

    started = time.monotonic()
    adaptation = finished(client, client.adapt(TRAIN_GALLERY, epochs=epochs).id, timeout)
    adapt_s = time.monotonic() - started
    started = time.monotonic()
    finished(client, client.activate(adaptation["bundle_id"]).id, timeout)
    activate_s = time.monotonic() - started

    after, _ = gallery_quality(client, TEST_GALLERY, test.query, stored, max_top_k=max_top_k)
    return Walkthrough(len(stored_train.items), before, after, adaptation["bundle_id"], adapt_s, activate_s,
                       adaptation)
