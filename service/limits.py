"""Back-pressure and request time limits: overload is answered at once, never left to hang.

* :class:`EmbedSlots` bounds the requests doing embedding work (search, upload, import, evaluate) at
  ``max_inflight``, with at most ``max_queued`` waiting: the next one gets ``429`` and a ``Retry-After``;
  one that waited ``queue_timeout_s`` for a slot gets ``503`` and a ``Retry-After``.
* :class:`TimeoutMiddleware` answers ``503 request_timeout`` after ``request_timeout_s`` (the work that
  runs in a thread finishes on its own; the client is not kept waiting).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, AsyncIterator

from fastapi import Depends, Request

from .errors import ApiError, error_response


class EmbedSlots:
    def __init__(self, inflight: int, queued: int, timeout_s: float):
        self.inflight, self.queued, self.timeout_s = inflight, queued, timeout_s
        self._sem = asyncio.Semaphore(inflight)
        self.waiting = 0

    async def acquire(self) -> None:
        if self._sem.locked() and self.waiting >= self.queued:
            raise ApiError(429, "too_many_requests", f"the service is busy ({self.inflight} requests embedding, "
                                                     f"{self.waiting} waiting); retry shortly",
                           headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await asyncio.wait_for(self._sem.acquire(), self.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(503, "overloaded", f"no embedding slot came free within {self.timeout_s:g} s; "
                                              "retry later", headers={"Retry-After": "5"}) from None
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self._sem.release()


async def embed_slot(request: Request) -> AsyncIterator[None]:
    """Dependency: hold one embedding slot for the request's lifetime."""
    slots: EmbedSlots | None = getattr(request.app.state, "embed_slots", None)
    if slots is None:
        s = request.app.state.settings
        slots = request.app.state.embed_slots = EmbedSlots(s.max_inflight, s.max_queued, s.queue_timeout_s)
    await slots.acquire()
    try:
        yield
    finally:
        slots.release()


EmbedSlot = Annotated[None, Depends(embed_slot)]


class TimeoutMiddleware:
    """Answer ``503 request_timeout`` when the app has not started its response within ``timeout_s``."""

    def __init__(self, app, timeout_s: float):
        self.app = app
        self.timeout_s = float(timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, tracking_send), self.timeout_s)
        except asyncio.TimeoutError:
            if started:
                raise
            resp = error_response(503, "request_timeout", f"the request took longer than {self.timeout_s:g} s",
                                  headers={"Retry-After": "5"})
            await resp(scope, receive, send)
