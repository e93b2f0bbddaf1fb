"""Per-connection limits uvicorn lacks: a deadline for each request head and a cap on its size.

uvicorn arms its keep-alive timer only after a response, so a client that opens a connection and sends its headers
a byte at a time (slowloris) holds the connection forever; its httptools parser also takes headers of any size.
guarded_protocol() returns a subclass of uvicorn's public HTTP protocol class (the one `http="auto"` picks), given
to uvicorn through its public `Config(http=...)`. It overrides only the asyncio.Protocol methods and runs a second
parser of the same kind over the received bytes to see where each request head begins and ends:

    connection opens / first byte of a later request --timer--> end of its head (b"\\r\\n\\r\\n")

The connection is closed when the timer fires first or the head passes max_bytes. Bodies and responses are not
timed (uvicorn's keep-alive timeout covers the idle time between requests).
"""
from __future__ import annotations

import asyncio
import sys

import h11

try:
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without [standard]: h11 only
    httptools = HttpToolsProtocol = None
from uvicorn.protocols.http.h11_impl import H11Protocol


class _Upgraded(Exception):
    """The request switches protocols: no further HTTP request follows on the connection."""


class H11Heads:
    """The callbacks of httptools.HttpRequestParser that HeadWatch uses (message begin, url, header, headers
    complete), from h11: uvicorn's parser when httptools is not installed."""

    def __init__(self, callbacks):
        self.callbacks, self.conn = callbacks, None

    def feed_data(self, data: bytes) -> None:
        while data:
            if self.conn is None:  # one h11 connection per request: no response is ever sent through it; no size
                self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=sys.maxsize)  # cap: HeadWatch's
                self.callbacks.on_message_begin()
            self.conn.receive_data(data)
            data = b""
            while (event := self.conn.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.Request):
                    self.callbacks.on_url(event.target)
                    for name, value in event.headers:
                        self.callbacks.on_header(name, value)
                    self.callbacks.on_headers_complete()
                elif event is h11.PAUSED:
                    if self.conn.their_state is not h11.DONE:
                        raise _Upgraded
                    data, self.conn = self.conn.trailing_data[0], None
                    break


_ERRORS = (h11.RemoteProtocolError,) + ((httptools.HttpParserError,) if httptools else ())
_UPGRADES = (_Upgraded,) + ((httptools.HttpParserUpgrade,) if httptools else ())


class HeadWatch:
    """One connection's request heads: a timer runs from the first byte of each head (for the first request, from
    the connection's opening) until the head is complete; when it fires, or when a head grows past max_bytes, the
    connection is closed. After a parse error or a protocol upgrade no further request can follow: any later byte
    starts a timer that is never stopped."""

    def __init__(self, transport: asyncio.Transport, timeout: float, max_bytes: int, kind: str):
        self.transport, self.timeout, self.max_bytes = transport, timeout, max_bytes
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.in_head, self.head_bytes, self.exact_bytes, self.oversized = False, 0, 0, False
        self.parser = httptools.HttpRequestParser(self) if kind == "httptools" else H11Heads(self)
        self.on_message_begin()

    def on_message_begin(self) -> None:
        self.in_head, self.head_bytes, self.exact_bytes = True, 0, 0
        if self.timer is None:
            self.timer = self.loop.call_later(self.timeout, self.close)

    def on_url(self, url: bytes) -> None:  # a head that arrives in one chunk is measured by its parts
        self.exact_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.exact_bytes += len(name) + len(value) + 4  # ": " and CRLF

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.oversized = self.oversized or self.exact_bytes > self.max_bytes
        self.stop()

    def feed(self, data: bytes) -> bool:
        """Follows `data`; False when the connection was closed for a head over max_bytes."""
        if self.parser is None:
            if self.timer is None:
                self.timer = self.loop.call_later(self.timeout, self.close)
            return True
        try:
            self.parser.feed_data(data)
        except _ERRORS + _UPGRADES:  # the server answers a malformed request itself (400) and closes
            self.parser, self.in_head = None, False
            self.stop()
        if self.in_head:  # a head still open counts whole chunks (a pipelined one may be charged the tail before it)
            self.head_bytes += len(data)
        if self.oversized or self.head_bytes > self.max_bytes:
            self.close()
            return False
        return True

    def close(self) -> None:
        self.stop()
        if not self.transport.is_closing():
            self.transport.close()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def guarded_protocol(header_timeout: float, max_header_bytes: int, http: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class for `http` ('auto': httptools when installed, as uvicorn picks; 'httptools';
    'h11') with a HeadWatch on every connection; pass it as uvicorn's `http=`."""
    kind = ("httptools" if httptools else "h11") if http == "auto" else http
    base = HttpToolsProtocol if kind == "httptools" else H11Protocol
    if base is None:
        raise ValueError("httptools is not installed")

    class HeadGuardedProtocol(base):
        def connection_made(self, transport):
            self.minimind_heads = HeadWatch(transport, header_timeout, max_header_bytes, kind)
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            if self.minimind_heads.feed(data):
                super().data_received(data)

        def connection_lost(self, exc):
            self.minimind_heads.stop()
            super().connection_lost(exc)

    HeadGuardedProtocol.__qualname__ = HeadGuardedProtocol.__name__ = f"HeadGuarded{base.__name__}"
    return HeadGuardedProtocol
