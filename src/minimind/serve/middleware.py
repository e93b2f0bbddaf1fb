"""API-key check and per-route request counting as a plain ASGI middleware.

Starlette's `@app.middleware("http")` (BaseHTTPMiddleware) re-streams every response body through an extra task
and memory channel: for SSE that is one more hop per token. This wrapper only looks at the scope and the
response-start message and passes everything else through untouched.
"""
from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from .errors import error_body

PUBLIC_PATHS = ("/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")


def _token(headers: list[tuple[bytes, bytes]]) -> str:
    """`Authorization: Bearer KEY`, else `x-api-key: KEY`, else ''."""
    found = {k.lower(): v for k, v in headers if k.lower() in (b"authorization", b"x-api-key")}
    auth = found.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return found.get(b"x-api-key", b"").decode("latin-1")


class AuthAndCount:
    def __init__(self, app, ctx):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ctx = self.ctx
        guarded = ctx.api_key and scope["method"] != "OPTIONS" and not scope["path"].startswith(PUBLIC_PATHS)
        if guarded and not hmac.compare_digest(_token(scope["headers"]).encode(), ctx.api_key.encode()):
            reply = JSONResponse(error_body(401, "invalid or missing API key (send `Authorization: Bearer KEY`)",
                                            None, "invalid_api_key"), status_code=401,
                                 headers={"WWW-Authenticate": "Bearer"})
            return await reply(scope, receive, send)
        if ctx.metrics is None:
            return await self.app(scope, receive, send)
        status = ["500"]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:  # the router put the matched route into the (shared) scope
            route = scope.get("route")
            ctx.metrics.http_requests.labels(scope["method"], getattr(route, "path", "other"), status[0]).inc()
