"""The adaptation product path over HTTP on real multi-shot data (scripts/adapt_walkthrough.py, the README's
walkthrough in small): CUHK03 training images as an unlabeled gallery -> adapt job -> activate -> the test
identities searched before and after. Real uvicorn, real redis-server, the real `reid adapt` subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.shared_data import require_shared_data

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "service" / "default_bundle"


def test_walkthrough_adapts_activates_and_measures_before_and_after(server_factory, make_settings):
    pytest.importorskip("torch", reason="adaptation runs `reid adapt`, which needs torch")
    require_shared_data()
    from models.data.datasets import load_dataset
    from models.gracl.train import GRACLConfig, training_samples
    from service.client import ReidClient

    from scripts.adapt_walkthrough import (TEST_GALLERY, TRAIN_GALLERY, first_identities, run_walkthrough,
                                           smaller_protocol)

    train = first_identities(training_samples(GRACLConfig(data=["cuhk03"], split=1)), 12)
    test = smaller_protocol(load_dataset("cuhk03", 1), 10)
    fast = ["--batches-per-epoch", "2", "--p", "4", "--k", "4", "--eps", "0.5", "--min-samples", "2", "--k1", "10",
            "--k2", "2", "--nformer-epochs", "0", "--threads", "2"]
    settings = make_settings(model_dir=DEFAULT_BUNDLE, adapt_extra_args=fast, adapt_min_images=32)
    with ReidClient(server_factory(settings).url) as client:
        parent = client.model()
        result = run_walkthrough(client, train, test, epochs=1, timeout=600, progress=False)

        # the service saw cameras and file names only, and laid the images out per camera for `reid adapt`
        record = client.images(TRAIN_GALLERY, limit=1).images[0]
        assert record.person_id is None and record.camera_id.startswith("cam")
        card = json.loads((settings.bundles_dir / result.bundle_id / "model.json").read_text())
        assert card["adaptation"]["images"] == result.images == len(train)
        assert card["adaptation"]["cameras"] == len({s.camid for s in train})
        assert card["parent"]["version"] == parent.version

        # after activation the service answers with the adapted model, over every gallery
        assert client.model().name == card["name"] != parent.name
        assert client.gallery(TEST_GALLERY).count == len(test.gallery)
    for quality in (result.before, result.after):
        assert quality.gallery == quality.ranked == len(test.gallery)  # the whole gallery ranked
        m = quality.metrics  # a query whose person has no image in another camera is skipped by the protocol
        assert m.evaluated_queries + m.skipped_queries == len(test.query) and m.evaluated_queries >= len(test.query) - 2
        assert 0 < quality.metrics.mAP <= 1
    # the new encoder ranks differently: the figures come from two models, not one measured twice
    assert not np.isclose(result.before.metrics.mAP, result.after.metrics.mAP, rtol=0, atol=1e-9)
    assert "before: rank-1" in result.summary() and result.bundle_id in result.summary()
