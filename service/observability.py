"""Prometheus metrics at ``GET /metrics`` (one registry per app, so several apps can share a process)."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
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
        g = GaugeMetricFamily("reid_index_vectors", "vectors in the in-memory FAISS index", labels=["gallery"])
        state = getattr(self.app.state, "reid", None)
        if state is not None:
            for name, idx in list(state.indexes.items()):
                g.add_metric([name], len(idx))
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


def install_metrics(app: FastAPI) -> None:
    registry = CollectorRegistry()
    requests = Counter("reid_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("reid_http_request_seconds", "HTTP request latency", ["method", "route"],
                        registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    # observed by the search routes (service/routes/search.py) for every refine mode but none
    app.state.refine_seconds = Histogram("reid_refine_seconds", "search-time refinement per request", ["mode"],
                                         registry=registry,
                                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    registry.register(_IndexCollector(app))
    app.state.metrics_registry = registry

    @app.middleware("http")
    async def _measure(request: Request, call_next):
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", None) or "unmatched"
            requests.labels(request.method, route, str(status)).inc()
            latency.labels(request.method, route).observe(time.perf_counter() - t0)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
