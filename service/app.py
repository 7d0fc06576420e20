"""FastAPI application factory.

``create_app(settings)`` wires the routes; its lifespan starts an embedded Redis when no
``redis_url`` is configured, loads the model bundle and ONNX Runtime embedder, rebuilds the
FAISS indexes from the store, starts the retention sweeper, and stops everything on shutdown.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from .batcher import MicroBatcher
from .deps import require_api_key
from .errors import BodySizeLimitMiddleware, install_error_handlers
from .limits import TimeoutMiddleware
from .observability import install_metrics
from .retention import RetentionSweeper
from .routes import adapt, decisions, galleries, health, images, imports, jobs, models, search
from .security_headers import SecurityHeadersMiddleware
from .settings import Settings
from .state import ServiceState

log = logging.getLogger("reid.service")

STATIC_DIR = Path(__file__).resolve().parent / "static"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServiceState(settings=settings)
        try:
            await run_in_threadpool(state.start)
        except BaseException:
            await run_in_threadpool(state.stop)
            raise
        # concurrent requests' images share encoder runs; batch sizes go to /metrics
        state.batcher = MicroBatcher(settings.batch_max_size, settings.batch_max_delay_ms,
                                     observe=app.state.batch_size.observe, workers=settings.embed_workers)
        app.state.reid = state
        app.state.retention = RetentionSweeper(state).start()  # per-gallery retention_days
        try:
            yield
        finally:
            app.state.reid = None
            await run_in_threadpool(state.batcher.stop)
            await run_in_threadpool(app.state.retention.stop)
            await run_in_threadpool(state.stop)

    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the fastapi-offline package, not a CDN
    # (the service runs without internet); the validator badge would call out to swagger.io
    app = FastAPIOffline(
        title="ReID retrieval service",
        version="0.1.0",
        description="Person re-identification: ingest images into named galleries, search by image.",
        lifespan=lifespan,
        static_url="/docs-assets",
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.reid = None
    app.state.settings = settings
    install_error_handlers(app)
    install_metrics(app, dependencies=[Depends(require_api_key)] if settings.metrics_require_key else [])
    app.add_middleware(BodySizeLimitMiddleware, limit=settings.max_upload_bytes)
    app.add_middleware(TimeoutMiddleware, timeout_s=settings.request_timeout_s)
    if settings.cors_origins:  # off unless origins are listed: the API key header must not leak cross-site
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "PATCH", "DELETE"],
                           allow_headers=["X-API-Key", "X-Request-ID", "Content-Type"],
                           expose_headers=["X-Request-ID", "Retry-After", "Location"])
    app.add_middleware(SecurityHeadersMiddleware)  # last added = outermost: the early 413s get them too
    auth = [Depends(require_api_key)]
    app.include_router(health.router)
    app.include_router(health.model_router, dependencies=auth)
    app.include_router(galleries.router, dependencies=auth)
    app.include_router(images.router, dependencies=auth)
    app.include_router(imports.router, dependencies=auth)
    app.include_router(decisions.router, dependencies=auth)
    app.include_router(search.router, dependencies=auth)
    app.include_router(adapt.router, dependencies=auth)
    app.include_router(models.router, dependencies=auth)
    app.include_router(jobs.router, dependencies=auth)

    @app.get("/", include_in_schema=False)
    async def index_page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")  # the page's JS and CSS

    return app
