"""Shared fixtures: a real Redis, a real (tiny) ONNX model bundle, real uvicorn servers.

No mocks: ``redis_url`` is an ``EmbeddedRedis`` (a real redis-server), ``tiny_bundle`` is an
ONNX graph written with the ``onnx`` helper API (no torch) plus a model.json with correct
sha256, and ``live_server`` / ``server_factory`` run the FastAPI app in real uvicorn.

Reuse for other bundles: ``server_factory(model_dir=path)`` or ``make_settings(model_dir=path)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from index.redis_cluster import find_redis_cli
from index.redis_server import EmbeddedRedis, RedisBinaryNotFound, find_redis_server, free_port
from tests.ci import missing

# ---------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server for the whole session (tests use unique gallery names)."""
    srv = EmbeddedRedis(tmp_path_factory.mktemp("redis-session"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of the session Redis, emptied (FLUSHDB) before and after each test for isolation."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield redis_server.url
    client.flushdb()
    client.close()


@pytest.fixture
def gallery_name() -> str:
    return f"g-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------- model bundle


def write_tiny_bundle(out_dir: Path, dim: int = 64, height: int = 64, width: int = 32, seed: int = 0,
                      name: str = "tiny-test", version: str = "0.0.1", normalized: bool = False) -> Path:
    """Write a small but real encoder bundle: conv3x3/s2 -> ReLU -> conv1x1 -> GAP -> flatten."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    hidden = 24
    w1 = rng.normal(0, 0.5, size=(hidden, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, size=(hidden,)).astype(np.float32)
    w2 = rng.normal(0, 0.5, size=(dim, hidden, 1, 1)).astype(np.float32)
    b2 = rng.normal(0, 0.1, size=(dim,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["features"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_encoder",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, height, width])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", dim])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="reid-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    enc = out_dir / "encoder.onnx"
    enc.write_bytes(model.SerializeToString())
    card = {
        "name": name,
        "version": version,
        "input": {"height": height, "width": width, "channel_order": "RGB",
                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "embedding_dim": dim,
        "normalized": normalized,
        "files": {"encoder.onnx": hashlib.sha256(enc.read_bytes()).hexdigest()},
        "backbone": "tiny random conv (tests only)",
        "recipe": None,
        "training_data": None,
        "evaluation": None,
    }
    (out_dir / "model.json").write_text(json.dumps(card, indent=2))
    return out_dir


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"))


# ---------------------------------------------------------------------------- images


def make_image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (48, 96),
                     color: tuple[int, int, int] | None = None) -> bytes:
    """A distinct image per seed: a base colour plus random blocks, encoded as ``fmt``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    base = np.array(color if color is not None else rng.integers(0, 256, 3), dtype=np.uint8)
    arr = np.broadcast_to(base, (h, w, 3)).copy()
    blocks = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    arr = ((arr.astype(np.int32) + np.kron(blocks, np.ones((8, 8, 1), np.int32))[:h, :w]) // 2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_bytes():
    """Factory: ``image_bytes(seed, fmt="PNG", size=(w, h), color=None) -> bytes``."""
    return make_image_bytes


# ---------------------------------------------------------------------------- settings and servers


@pytest.fixture
def make_settings(tmp_path, redis_url, tiny_bundle):
    """Factory for ``Settings`` pointed at a tmp data_dir, the session Redis and the tiny bundle."""
    from service.settings import Settings

    def make(**overrides):
        kw = dict(data_dir=tmp_path / "data", redis_url=redis_url, model_dir=tiny_bundle, ort_threads=1)
        kw.update(overrides)
        return Settings(**kw)

    return make


class LiveServer:
    """The app under real uvicorn in a background thread, on a free port."""

    def __init__(self, settings, start_timeout: float = 60.0):
        import uvicorn

        from service.app import create_app

        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.exit_code = None
        self.thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"uvicorn exited during start-up with code {self.exit_code} "
                                   "(see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("uvicorn did not start in time")
            time.sleep(0.02)

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit as e:  # uvicorn exits with code 3 when the lifespan start-up fails
            self.exit_code = e.code

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture
def server_factory(make_settings):
    """Factory: ``server_factory(**settings_overrides) -> LiveServer`` (stopped at teardown)."""
    servers: list[LiveServer] = []

    def start(settings=None, **overrides) -> LiveServer:
        srv = LiveServer(settings if settings is not None else make_settings(**overrides))
        servers.append(srv)
        return srv

    yield start
    for s in reversed(servers):
        s.stop()


@pytest.fixture
def live_server(server_factory) -> str:
    """Base URL of a running server (tmp data_dir, session Redis, tiny bundle)."""
    return server_factory().url


def add_nformer(bundle_dir: Path, seed: int = 0, heads: int = 2, layers: int = 2, topk: int = 5, landmarks: int = 3,
                noise: float = 0.2) -> Path:
    """Add a small NFormer (``nformer.onnx`` exported with torch, plus the card's ``nformer`` entry and sha256)
    to a bundle written by :func:`write_tiny_bundle`. Its weights are pushed off the near-identity init so that
    refinement visibly changes rankings. Imports torch: tests only (the service never does)."""
    import torch

    from index.bundle import sha256_file
    from models.export import export_nformer
    from models.nformer import NFormer, NFormerConfig

    bundle_dir = Path(bundle_dir)
    card = json.loads((bundle_dir / "model.json").read_text())
    torch.manual_seed(seed)
    model = NFormer(NFormerConfig(dim=card["embedding_dim"], heads=heads, layers=layers, topk=topk,
                                  landmarks=landmarks, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    model.eval()
    export_nformer(model, bundle_dir / "nformer.onnx")
    card["nformer"] = {**model.cfg.card()}
    card["files"]["nformer.onnx"] = sha256_file(bundle_dir / "nformer.onnx")
    (bundle_dir / "model.json").write_text(json.dumps(card, indent=2))
    return bundle_dir


@pytest.fixture(scope="session")
def nformer_bundle(tmp_path_factory) -> Path:
    """The tiny encoder bundle plus a tiny random ``nformer.onnx`` (refine=local/joint available)."""
    return add_nformer(write_tiny_bundle(tmp_path_factory.mktemp("tiny-nformer-bundle"), name="tiny-nformer"))


def within(seconds: float, check) -> float:
    """Poll ``check()`` until it is true; returns how long that took (the test fails after ``seconds``)."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < seconds, f"not within {seconds}s"
        time.sleep(0.01)
    return time.monotonic() - t0


def redis_cluster_binary() -> str:
    """The redis-server binary, with a redis-cli beside it (or on PATH); else skip (fail under CI=true)."""
    try:
        server = find_redis_server()
    except RedisBinaryNotFound as e:
        missing(str(e))
    if not (os.path.isfile(server) and os.access(server, os.X_OK)):
        missing(f"redis-server {server} is not an executable file")
    try:
        find_redis_cli(server)
    except RedisBinaryNotFound as e:
        missing(str(e))
    return server
