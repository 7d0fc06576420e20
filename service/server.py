"""Run the service with uvicorn (``reid serve``)."""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .observability import setup_json_logging
from .settings import Settings


def run(settings: Settings | None = None, host: str | None = None, port: int | None = None,
        log_level: str = "info") -> None:
    """Serve the API until interrupted. One process: the embedded Redis and indexes live in it."""
    settings = settings or Settings()
    setup_json_logging(getattr(logging, log_level.upper(), logging.INFO))  # JSON lines with request ids
    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port,
                log_level=log_level, workers=1, log_config=None, access_log=False)
