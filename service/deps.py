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

#: methods a read-only key may use; every other method under /v1 is a write ...
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: ... unless its route says it only reads (search by POSTed image, evaluate): ``openapi_extra=READ_ONLY``
READ_ONLY = {"x-access": "read"}


def _reads_only(request: Request) -> bool:
    if request.method in READ_METHODS:
        return True
    extra = getattr(request.scope.get("route"), "openapi_extra", None) or {}
    return extra.get("x-access") == "read"


def _matches(key: bytes, keys: list[str]) -> bool:
    # compare against every configured key (no early exit), so timing does not tell which one matched
    found = False
    for k in keys:
        found |= hmac.compare_digest(key, k.encode())
    return found


def require_api_key(request: Request, key: Annotated[str | None, Security(_api_key_header)]) -> None:
    """Keys from settings: none configured = open; else a read key may GET, a write key may do anything.

    The access needed follows the HTTP method, so a new write route cannot forget to ask for a write key."""
    s = request.app.state.settings
    read_keys, write_keys = s.read_keys, s.write_keys
    if not read_keys and not write_keys:
        return
    if key is None:
        raise ApiError(401, "unauthorized", "missing X-API-Key header", headers={"WWW-Authenticate": "X-API-Key"})
    raw = key.encode()
    is_write = _matches(raw, write_keys)
    is_read = _matches(raw, read_keys)
    if not (is_write or is_read):
        raise ApiError(401, "unauthorized", "wrong X-API-Key header", headers={"WWW-Authenticate": "X-API-Key"})
    if not is_write and not _reads_only(request):
        raise ApiError(403, "forbidden", "this API key is read-only; writing needs a read-write key")
