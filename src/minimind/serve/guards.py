"""Request guards as plain ASGI middleware: the Host/Origin allowlist against DNS rebinding and the request-body size
cap. They read only the scope and the ASGI messages, so they work the same under any ASGI server."""
from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

from .errors import error_body_for
from .limits import LOOPBACK_HOSTS


async def send_error(send, status: int, message: str, code: str, path: str = "") -> None:
    """A whole response in the error shape of the API `path` belongs to, sent without the app."""
    body = json.dumps(error_body_for(path)(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value
    return None


def host_name(value: str) -> str | None:
    """'LocalHost:8000' -> 'localhost', '[::1]:80' and '::1' -> '::1', 'example.com.' -> 'example.com'; None when
    it does not parse."""
    value = value.strip()
    if value.count(":") > 1 and not value.startswith("["):  # a bare IPv6 address
        value = f"[{value}]"
    try:
        name = urlsplit("//" + value).hostname
    except ValueError:
        return None
    return name.rstrip(".") if name else None


def is_loopback(host: str) -> bool:
    name = host_name(host)
    if name == "localhost":
        return True
    try:
        return name is not None and ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def effective_allowed_hosts(bind_host: str, allowed: list[str] | None) -> tuple[str, ...] | None:
    """What `minimind serve --host H [--allowed-hosts ...]` accepts: the loopback names plus `allowed`; None (no
    check) when bound to a non-loopback address without --allowed-hosts, or when `allowed` holds '*'."""
    if (allowed is None and not is_loopback(bind_host)) or "*" in (allowed or ()):
        return None
    return LOOPBACK_HOSTS + tuple(allowed or ())


class HostGuard:
    """403 unless the Host header (when sent) and the Origin header (when sent: browsers send it on cross-origin
    and on POST requests) name an allowed host. A web page that rebinds its own domain to 127.0.0.1 reaches this
    server with its domain in both headers: the allowlist of the server's own names keeps it out."""

    def __init__(self, app, allowed_hosts):
        self.app = app
        self.allowed = frozenset(filter(None, map(host_name, allowed_hosts)))

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            for header in (b"host", b"origin"):
                raw = _header(scope, header)
                if raw is None:
                    continue
                value = raw.decode("latin-1")
                name = host_name(urlsplit(value).netloc if header == b"origin" else value)
                if name not in self.allowed:
                    what = "Host" if header == b"host" else "Origin"
                    hint = f"--allowed-hosts {name}" if name else "--allowed-hosts HOST"
                    return await send_error(send, 403, f"{what} {value!r} is not allowed (DNS-rebinding guard); "
                                            f"start the server with {hint} to accept it", "host_not_allowed",
                                            scope["path"])
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a request body over max_bytes: from Content-Length before any of the body is read, and for a chunked
    body as soon as the bytes received pass the limit (the app then sees a disconnect and its own reply is
    dropped). The server discards the rest of the body; the connection stays usable."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def message(self) -> str:
        return f"request body is larger than {self.max_bytes} bytes (the server's --max-body-bytes)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            return await send_error(send, 413, self.message(), "body_too_large", scope["path"])
        received, started, replied = 0, False, False

        async def counted_receive():
            nonlocal received, replied
            if replied:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started and not replied:
                        await send_error(send, 413, self.message(), "body_too_large", scope["path"])
                        replied = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if replied:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, guarded_send)
