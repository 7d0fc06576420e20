"""Run the service with uvicorn (``reid serve``)."""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .settings import Settings


def run(settings: Settings | None = None, host: str | None = None, port: int | None = None,
        log_level: str = "info") -> None:
    """Serve the API until interrupted. One process: the embedded Redis and indexes live in it."""
    settings = settings or Settings()
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port,
                log_level=log_level, workers=1)
