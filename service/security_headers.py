"""Security headers: ``nosniff`` on every answer; the web page (``/`` and ``/static/``) also gets a strict
Content-Security-Policy, ``X-Frame-Options: DENY`` and ``Referrer-Policy: no-referrer``.

The page runs only its own script file (no inline script or handler), draws thumbnails from ``blob:`` URLs
(they are fetched with the API key header) and talks only to this origin, so the policy can allow nothing
else: an injected script or a framing site (clickjacking) gets nowhere. The API's JSON answers are not pages
and the Swagger UI at ``/docs`` has an inline script of FastAPI's, so neither gets the page policy.
"""

from __future__ import annotations

PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

NOSNIFF = {"X-Content-Type-Options": "nosniff"}  # also set by the 500 handler, which answers past this middleware
_EVERY_ANSWER = [(k.lower().encode(), v.encode()) for k, v in NOSNIFF.items()]
_PAGE = [(b"content-security-policy", PAGE_CSP.encode()), (b"x-frame-options", b"DENY"),
         (b"referrer-policy", b"no-referrer")]


def is_page(path: str) -> bool:
    return path == "/" or path.startswith("/static/")


class SecurityHeadersMiddleware:
    """Adds the headers above to each response's start (plain ASGI: streamed bodies pass untouched)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = _EVERY_ANSWER + (_PAGE if is_page(scope.get("path", "")) else [])

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in extra if h[0] not in names)]
            await send(message)

        return await self.app(scope, receive, send_with_headers)
