"""FastAPI dependencies."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from .errors import ApiError
from .state import ServiceState


def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "reid", None)
    if state is None or state.embedder is None or state.store is None:
        raise ApiError(503, "not_ready", "the service is starting up", headers={"Retry-After": "5"})
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def existing_gallery(gallery: str, state: StateDep) -> str:
    """Path parameter ``gallery`` that must exist (404 otherwise)."""
    if not state.store.gallery_exists(gallery):
        raise ApiError(404, "gallery_not_found", f"gallery {gallery!r} does not exist")
    return gallery


GalleryDep = Annotated[str, Depends(existing_gallery)]


_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def require_api_key(request: Request, key: Annotated[str | None, Security(_api_key_header)]) -> None:
    """Enforce ``settings.api_key`` (when configured) on the /v1 routes."""
    expected = request.app.state.settings.api_key
    if not expected:
        return
    if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header",
                       headers={"WWW-Authenticate": "X-API-Key"})
