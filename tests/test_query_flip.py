"""query_flip in a bundle's card: the service (real uvicorn, real Redis, ONNX Runtime) and the offline evaluator
embed a query as the normalised mean of the image's and its mirror image's embeddings; gallery images, and so
the stored vectors, stay one run each. Without the card field nothing changes."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from index.bundle import BundleError, load_bundle
from index.vector_index import l2_normalize
from models.data.datasets import Sample
from models.evaluate import BundleEncoder
from service.client import ReidClient
from service.embedder import Embedder, mirror
from tests.conftest import make_image_bytes


def with_query_flip(bundle_dir, out_dir, value):
    shutil.copytree(bundle_dir, out_dir)
    card = json.loads((out_dir / "model.json").read_text())
    card["query_flip"] = value
    (out_dir / "model.json").write_text(json.dumps(card))
    return out_dir


def write_images(folder, count):
    folder.mkdir()
    paths = []
    for seed in range(count):
        path = folder / f"{seed}.png"
        path.write_bytes(make_image_bytes(seed, size=(40, 80)))
        paths.append(path)
    return paths


def test_mirror_flips_left_to_right():
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(mirror(array), array[:, ::-1])
    assert np.array_equal(np.asarray(mirror(Image.fromarray(array))), array[:, ::-1])


def test_the_card_field_must_be_a_boolean(tiny_bundle, tmp_path):
    assert load_bundle(tiny_bundle).query_flip is False  # absent: off
    assert load_bundle(with_query_flip(tiny_bundle, tmp_path / "on", True)).query_flip is True
    with pytest.raises(BundleError, match="query_flip"):
        load_bundle(with_query_flip(tiny_bundle, tmp_path / "bad", "yes"))


@pytest.mark.parametrize("flip", [False, True])
def test_search_scores_are_those_of_the_flip_averaged_query(flip, tiny_bundle, tmp_path, server_factory):
    bundle = with_query_flip(tiny_bundle, tmp_path / "bundle", flip)
    paths = write_images(tmp_path / "images", 6)
    embedder = Embedder(bundle, threads=1)
    images = [Image.open(p).convert("RGB") for p in paths]
    stored = embedder.embed(images)
    query = stored[0] if not flip else l2_normalize(embedder.embed(images[:1]) + embedder.embed([mirror(images[0])]))[0]
    assert flip == (not np.allclose(query, stored[0], atol=1e-4))  # the tiny encoder is not mirror-symmetric

    server = server_factory(model_dir=bundle)
    with ReidClient(server.url) as client:
        ingested = client.ingest("g", paths)
        answer = client.search("g", paths[0], top_k=6)
        by_stored = client.search_image("g", ingested.items[0].id, top_k=6)  # a stored vector as the query
    by_id = {item.id: i for i, item in enumerate(ingested.items)}
    assert len(answer.results) == 6 and by_stored.results
    for result in answer.results:
        assert abs(result.score - float(query @ stored[by_id[result.id]])) < 1e-4
    for result in by_stored.results:  # the stored vectors are the plain embeddings: the gallery side never flips
        assert abs(result.score - float(stored[0] @ stored[by_id[result.id]])) < 1e-4


def test_offline_evaluator_embeds_queries_as_the_service_does(tiny_bundle, tmp_path):
    bundle = with_query_flip(tiny_bundle, tmp_path / "bundle", True)
    paths = write_images(tmp_path / "images", 3)
    samples = [Sample(str(p), pid=i, camid=0) for i, p in enumerate(paths)]
    encoder, embedder = BundleEncoder(bundle), Embedder(bundle, threads=1)
    images = [Image.open(p).convert("RGB") for p in paths]
    expected = l2_normalize(embedder.embed(images) + embedder.embed([mirror(im) for im in images]))
    np.testing.assert_allclose(l2_normalize(encoder.embed_queries(samples)), expected, atol=1e-4)
    np.testing.assert_allclose(l2_normalize(encoder.embed(samples)), embedder.embed(images), atol=1e-4)
