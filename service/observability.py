"""Prometheus metrics at ``GET /metrics`` (one registry per app, so several apps can share a process),
request ids (``X-Request-ID``, echoed back and put on every log line) and JSON logs.

Per-stage timings go to ``reid_stage_seconds{stage}`` (decode, embed, search, refine, store) through
:func:`observe_stage`; errors are counted by code in ``reid_errors{code}``; the micro-batcher's batch sizes
in ``reid_embed_batch_size`` (average batch = sum / count, Triton's convention).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

#: IndexSync.stats key -> (metric name, help)
_SYNC_COUNTERS = {
    "snapshot_loads": ("reid_index_snapshot_loads", "gallery indexes loaded from a snapshot at start"),
    "rebuilds": ("reid_index_rebuilds", "gallery indexes built from the vectors stored in Redis"),
    "snapshot_writes": ("reid_index_snapshot_writes", "gallery index snapshots written"),
    "events_applied": ("reid_events_applied", "change-log entries applied to the indexes"),
    "events_replayed_at_start": ("reid_events_replayed_at_start", "change-log entries replayed at start"),
    "resyncs": ("reid_index_resyncs", "resynchronisations after the Redis store came back"),
}


class _IndexCollector:
    def __init__(self, app: FastAPI):
        self.app = app

    def collect(self):
        g = GaugeMetricFamily("reid_index_vectors", "vectors in the in-memory FAISS index, by the index family "
                              "serving now (flat while an IVF gallery is below its threshold or training)",
                              labels=["gallery", "index"])
        state = getattr(self.app.state, "reid", None)
        if state is not None:
            for name, idx in list(state.indexes.items()):
                g.add_metric([name, idx.kind], len(idx))
        yield g
        sync = getattr(state, "sync", None)
        if sync is not None:
            for key, (name, doc) in _SYNC_COUNTERS.items():
                c = CounterMetricFamily(name, doc)
                c.add_metric([], sync.stats[key])
                yield c
        follower = getattr(state, "follower", None)
        if follower is not None:
            yield GaugeMetricFamily("reid_follower_connected", "1 while the change-log follower reaches Redis",
                                    value=int(follower.connected))
        persistence = getattr(state, "persistence", None)
        if persistence is not None:
            yield GaugeMetricFamily("reid_store_durable", "1 if every acknowledged write survives a crash of Redis",
                                    value=int(bool(persistence.durable)))


request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
STAGES = ("decode", "embed", "search", "refine", "store")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id (when in a request), exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_json_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True


def observe_stage(app_state, stage: str, seconds: float | None) -> None:
    hist = getattr(app_state, "stage_seconds", None)
    if hist is not None and seconds is not None:
        hist.labels(stage).observe(seconds)


def count_error(app_state, code: str) -> None:
    counter = getattr(app_state, "errors_counter", None)
    if counter is not None:
        counter.labels(code).inc()


class _RequestMetrics:
    """Per request: an id (the caller's ``X-Request-ID`` if well-formed, else new; echoed back and on every log
    line), the request counter and latency by route, an access-log line. Plain ASGI, not ``@app.middleware``:
    Starlette's BaseHTTPMiddleware relays every body chunk through extra tasks, which costs a large batch upload
    measurable CPU."""

    def __init__(self, app, requests: Counter, latency: Histogram, access: logging.Logger):
        self.app, self.requests, self.latency, self.access = app, requests, latency, access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500
        given = next((v.decode("latin-1") for k, v in scope.get("headers") or [] if k == b"x-request-id"), "")
        rid = given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            elapsed = time.perf_counter() - t0
            self.requests.labels(scope["method"], route, str(status)).inc()
            self.latency.labels(scope["method"], route).observe(elapsed)
            self.access.info("%s %s %s %.1f ms", scope["method"], scope["path"], status, elapsed * 1000.0)
            request_id.reset(token)


def install_metrics(app: FastAPI, dependencies: Sequence[Any] = ()) -> None:
    """The registry, the request middleware and ``GET /metrics`` (guarded by ``dependencies``, e.g. the API key
    check when REID_METRICS_REQUIRE_KEY is set)."""
    registry = CollectorRegistry()
    requests = Counter("reid_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("reid_http_request_seconds", "HTTP request latency", ["method", "route"],
                        registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    # observed by the search routes (service/routes/search.py) for every refine mode but none
    app.state.refine_seconds = Histogram("reid_refine_seconds", "search-time refinement per request", ["mode"],
                                         registry=registry,
                                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    buckets = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
    app.state.stage_seconds = Histogram("reid_stage_seconds", "time per request stage", ["stage"],
                                        registry=registry, buckets=buckets)
    app.state.batch_size = Histogram("reid_embed_batch_size", "images per encoder run (micro-batches)",
                                     registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    app.state.errors_counter = Counter("reid_errors", "error answers by code", ["code"], registry=registry)
    registry.register(_IndexCollector(app))
    access = logging.getLogger("reid.access")
    app.state.metrics_registry = registry

    app.add_middleware(_RequestMetrics, requests=requests, latency=latency, access=access)

    @app.get("/metrics", include_in_schema=False, dependencies=list(dependencies))
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
