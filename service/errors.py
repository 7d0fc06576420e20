"""Uniform JSON errors: ``{"error": {"code": "<snake_case>", "message": "..."}}``."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import redis

from index.durability import NotDurable
from index.store import GalleryModelMismatch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .security_headers import NOSNIFF

# python-multipart's caps on a multipart part's header lines (its Content-Disposition carries the file name);
# Starlette reports a breach as a bare "Invalid multipart data."
try:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import DEFAULT_MAX_HEADER_COUNT, DEFAULT_MAX_HEADER_SIZE
except ImportError:  # python-multipart before 0.0.13: another module name, and no such caps
    FormParserError, DEFAULT_MAX_HEADER_COUNT, DEFAULT_MAX_HEADER_SIZE = (), None, None

log = logging.getLogger("reid.service")

RETRY_AFTER_S = 5

_DEFAULT_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
    415: "unsupported_media_type", 422: "validation_error", 429: "too_many_requests",
    500: "internal_error", 503: "service_unavailable",
}


class ApiError(StarletteHTTPException):
    """An HTTP error with a machine-readable ``code`` and optional extra body fields."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code
        self.message = message
        self.extra = extra or {}


#: marks a validation error raised by `field_error` (in its context, where FastAPI keeps it)
_OWN_CODE = "reid_error_code"


def field_error(code: str, message: str, **ctx: str) -> PydanticCustomError:
    """A form field's validation error (raised by its pydantic validator) that FastAPI's 422 answers with
    ``code`` rather than validation_error: a field that its type now checks keeps the code it had when the
    route checked it. ``message`` may name ``{key}``s of ``ctx``."""
    return PydanticCustomError(code, message, {_OWN_CODE: True, **ctx})


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}, **extra}


def error_response(status: int, code: str, message: str, headers: dict | None = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(code, message, **extra), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "form"))
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _explain_multipart(exc: StarletteHTTPException) -> StarletteHTTPException:
    """Starlette's 400 for a multipart body the parser refused, with the parser's reason (and, for a part
    header over the cap, the limit and what usually breaks it: a long file name)."""
    if exc.status_code != 400 or isinstance(exc, ApiError):
        return exc
    cause = exc.__cause__ or exc.__context__
    while cause is not None and not isinstance(cause, FormParserError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return exc
    reason = str(cause)
    if reason == "Maximum header size exceeded" and DEFAULT_MAX_HEADER_SIZE:
        return ApiError(400, "multipart_header_too_large", f"a multipart part's header line is over "
                        f"{DEFAULT_MAX_HEADER_SIZE} bytes, the parser's limit: its Content-Disposition carries "
                        "the file name, so shorten the file name (or the field name)")
    if reason == "Maximum header count exceeded" and DEFAULT_MAX_HEADER_COUNT:
        return ApiError(400, "multipart_header_too_large", f"a multipart part has more than "
                        f"{DEFAULT_MAX_HEADER_COUNT} header lines, the parser's limit")
    return ApiError(400, "bad_request", f"invalid multipart body: {reason}")


def install_error_handlers(app: FastAPI) -> None:
    from .observability import count_error  # errors by code, in /metrics

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        exc = _explain_multipart(exc)
        if isinstance(exc, ApiError):
            count_error(request.app.state, exc.code)
            return error_response(exc.status_code, exc.code, exc.message, exc.headers, **exc.extra)
        code = _DEFAULT_CODES.get(exc.status_code, "error")
        count_error(request.app.state, code)
        msg = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return error_response(exc.status_code, code, msg, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        own = {e["type"] if (e.get("ctx") or {}).get(_OWN_CODE) else None for e in exc.errors()}
        if len(own) == 1 and None not in own:  # only field_error()s, all of one code
            code = own.pop()
            count_error(request.app.state, code)
            return error_response(422, code, "; ".join(e["msg"] for e in exc.errors()))
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
                   for e in exc.errors()]
        count_error(request.app.state, "validation_error")
        return error_response(422, "validation_error", _validation_message(exc), details=details)

    async def _store_down(request: Request, exc: Exception):
        log.warning("store unavailable: %s", exc)
        count_error(request.app.state, "store_unavailable")
        return error_response(503, "store_unavailable", f"the Redis store is unavailable: {exc}",
                              headers={"Retry-After": str(RETRY_AFTER_S)})

    # ConnectionError covers BusyLoadingError (a restarted Redis replaying its AOF); NotDurable is a write that
    # Redis did not fsync (WAITAOF) or replicate (WAIT) in time: retrying it is safe, ids are content hashes.
    app.add_exception_handler(redis.exceptions.ConnectionError, _store_down)
    app.add_exception_handler(redis.exceptions.TimeoutError, _store_down)
    app.add_exception_handler(NotDurable, _store_down)
    # Redis Cluster during a failover: the master of a slot is down and no replica took over yet (CLUSTERDOWN,
    # TRYAGAIN, a slot nobody serves, a redirection that outlived the client's retries). Each passes in seconds.
    for exc_class in (redis.exceptions.ClusterError, redis.exceptions.TryAgainError, redis.exceptions.AskError,
                      redis.exceptions.RedisClusterException, redis.exceptions.ReadOnlyError):
        app.add_exception_handler(exc_class, _store_down)

    @app.exception_handler(GalleryModelMismatch)
    async def _model_mismatch(request: Request, exc: GalleryModelMismatch):
        # Nothing was written. A replica that has not yet followed another's activation catches up within seconds
        # (service.follower): retry. Otherwise the gallery is of an earlier model (an upgraded default bundle).
        state = request.app.state.reid
        active = state.recorded_active_bundle()
        if active != state.bundle_id:
            count_error(request.app.state, "model_switching")
            return error_response(503, "model_switching", f"{exc}: another replica has activated model bundle "
                                  f"{active!r} and this one is switching to it; retry",
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
        count_error(request.app.state, "gallery_model_mismatch")
        return error_response(409, "gallery_model_mismatch", f"{exc}; nothing was written, so that its searches never "
                              f"compare two models' features. POST /v1/models/{state.bundle_id}/activate re-embeds "
                              "the galleries from their kept images (or delete the gallery and ingest it again)")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        count_error(request.app.state, "internal_error")
        # answered by Starlette's outermost middleware, past SecurityHeadersMiddleware: its header is set here
        return error_response(500, "internal_error", "internal server error", headers=NOSNIFF)


class BodySizeLimitMiddleware:
    """Reject bodies over ``limit`` bytes: by Content-Length up front, else while streaming."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                resp = error_response(400, "bad_request", "invalid Content-Length header")
                return await resp(scope, receive, send)
            if n > self.limit:
                resp = error_response(413, "payload_too_large",
                                      f"request body of {n} bytes exceeds the limit of {self.limit} bytes")
                return await resp(scope, receive, send)
        if cl is not None or b"chunked" not in headers.get(b"transfer-encoding", b""):
            return await self.app(scope, receive, send)
        # Chunked body without Content-Length: read it up to the limit first, then replay it.
        # (Raising mid-stream would surface as a form-parsing 400 inside FastAPI.)
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client disconnected
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                resp = error_response(413, "payload_too_large",
                                      f"request body exceeds the limit of {self.limit} bytes")
                return await resp(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive():
            if replay:
                return replay.pop()
            return await receive()

        return await self.app(scope, replay_receive, send)
