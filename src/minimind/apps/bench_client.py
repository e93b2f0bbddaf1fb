"""The load generator of `minimind bench --server`: N streaming requests at once on one epoll selector, each
timed (start, first text chunk, end) and counted.

It runs on the same 2 CPUs as the server it measures, so every microsecond it spends is taken from that
server's engine, where a remote client would cost it nothing. Hence no HTTP library and no asyncio: plain
non-blocking sockets, byte scans instead of JSON per event (_SSEReader, tally), and after the first token no
wake per chunk: the kernel's receive stamps time the stream, a read every POLL_INTERVAL collects it (asyncio
streams with a wait_for per read cost ~9 us of client CPU per token at 32 streams; docs/benchmarks.md, "Twelfth"
and "Fifteenth session"). With a Pool, the connections stay open from round to round (HTTP/1.1 keep-alive) and a
stream ends at its chunked body's end.

Both `minimind serve` and llama-server get the same request: a token-id prompt, `max_tokens` with `ignore_eos`
(so every request generates exactly that many tokens), plain sampling at `temperature` (top_k/top_p/min_p off),
`stream: true` with `stream_options.include_usage` (the final chunk's usage gives the token count).
"""
from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import struct
import sys
import time

from .bench_http import percentile

TEXT = b'"text":"'  # opens a completion chunk's text: cannot occur inside a JSON string (its quotes are escaped)


class _SSEReader:
    """Server-sent events out of an HTTP/1.1 response body, chunked (uvicorn, llama-server) or not, with nothing
    but byte scans: the load generator shares the 2 CPUs with the server it measures, and an httpx line iterator
    plus a json.loads per event cost ~0.3 ms per token here, more than the server's own HTTP work."""

    def __init__(self, chunked: bool):
        self.chunked, self.raw, self.body, self.done = chunked, b"", b"", False

    def _append(self, data: bytes) -> None:
        if not self.chunked:
            self.body += data
            return
        raw, pos, parts = self.raw + data, 0, [self.body]
        while True:  # positions into one buffer: no copy of the remainder per chunk
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(raw[pos:eol].split(b";")[0], 16)
            if size == 0:
                self.done = True
                break
            if len(raw) < eol + 2 + size + 2:
                break
            parts.append(raw[eol + 2:eol + 2 + size])
            pos = eol + 2 + size + 2
        self.raw, self.body = raw[pos:], b"".join(parts)

    def feed(self, data: bytes) -> list[bytes]:
        """The complete `data:` events so far, one by one."""
        self._append(data)
        events = self.body.split(b"\n\n")
        self.body = events.pop()  # an incomplete event waits for more bytes
        return [e for e in events if e.startswith(b"data:")]

    def feed_block(self, data: bytes) -> bytes:
        """The complete events so far as one block, for tally()."""
        self._append(data)
        end = self.body.rfind(b"\n\n")
        cut = end + 2 if end >= 0 else 0
        block, self.body = self.body[:cut], self.body[cut:]
        return block


def tally(block: bytes) -> tuple[int, int | None, dict | None, bool]:
    """(chunks with text, usage completion_tokens or None, error object or None, [DONE] seen) of a block of SSE
    events, by whole-buffer scans: a per-event loop in the load generator would cost the measured server ~10 us
    of CPU per token. `"text":"` cannot occur inside a JSON string (its quotes would be escaped)."""
    chunks = block.count(TEXT) - block.count(TEXT + b'"')
    error = None
    at = block.find(b'data: {"error"')
    if at >= 0:
        error = json.loads(block[at + 5:block.find(b"\n\n", at)])["error"]
    tokens = None
    at = block.rfind(b'"usage":{')
    if at >= 0:
        start = block.rfind(b"data:", 0, at) + 5
        end = block.find(b"\n\n", at)
        tokens = json.loads(block[start:end if end >= 0 else len(block)])["usage"].get("completion_tokens")
    return chunks, tokens, error, b"data: [DONE]" in block


# The kernel stamps each received packet (SO_TIMESTAMPNS): a read reports the arrival of the last packet it took, so
# the times of the first text chunk and of a stream's end do not depend on when the client wakes. Once the first
# token is in, a stream asks the kernel not to wake the client at all (a low-water mark of QUIET_RCVLOWAT bytes,
# more than a stream sends) and the client reads every such stream every POLL_INTERVAL s, taking its end's time
# from the stamp. Each wake of the client is CPU taken from the server it measures: waking for every chunk near a
# stream's end (its last ~55, where the client could not yet be sure which bytes were the last) slowed the server's
# decode steps there by ~9 % (docs/benchmarks.md, "Fifteenth session"). Without stamps (not Linux) every chunk is
# read as it comes; a read whose stamp is missing takes the time of the read.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform.startswith("linux") else None)  # asm-generic
QUIET_RCVLOWAT = 1 << 18
POLL_INTERVAL = 0.05
RECV_BYTES = 65536  # below glibc's mmap threshold: a larger recv buffer is mapped and unmapped every call


class Pool:
    """Connections to one server kept open from round to round (HTTP/1.1 keep-alive), as the clients people put in
    front of a server do (the openai SDK's httpx pool, aiohttp sessions): a request then costs neither side a TCP
    connection set-up and tear-down (for `minimind serve` ~0.7 ms of event-loop CPU per request; docs/benchmarks.md,
    "Fourteenth session")."""

    def __init__(self):
        self.idle: list[socket.socket] = []

    def take(self) -> socket.socket | None:
        """An idle connection the server has not closed meanwhile (its idle timeout), or None."""
        while self.idle:
            sock = self.idle.pop()
            try:
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":  # the server closed it
                    sock.close()
                    continue
            except BlockingIOError:  # nothing to read: open
                return sock
            except OSError:
                sock.close()
                continue
            sock.close()  # unexpected bytes between responses: not reusable
        return None

    def close(self) -> None:
        for sock in self.idle:
            sock.close()
        self.idle = []


class _Stream:
    """One streaming request on its own connection; the selector in stream_requests drives it."""

    def __init__(self, host: str, port: int, request: bytes, sock: socket.socket | None = None):
        self.start = time.perf_counter()
        self.host, self.port, self.request = host, port, request
        self.reused = sock is not None
        self.sock = sock if sock is not None else self._connect()
        self.pending = memoryview(request)
        self.head, self.sse = b"", None
        self.first = self.end = None
        self.chunks, self.tokens, self.rest = 0, None, []
        self.quiet, self.keep = False, False
        self.stamped = self._stamp(self.sock)
        self.clock = time.time() - time.perf_counter()  # the stamps' clock (realtime) -> perf_counter's

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect_ex((self.host, self.port))  # EINPROGRESS; the selector says when it is writable
        return sock

    def reconnect(self) -> None:
        """A kept-alive connection the server closed before answering (it had not read the request): anew."""
        self.sock.close()
        self.sock, self.reused, self.pending, self.head = self._connect(), False, memoryview(self.request), b""
        self.stamped = self._stamp(self.sock)

    @staticmethod
    def _stamp(sock: socket.socket) -> bool:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except (OSError, TypeError):
            return False
        return True

    def _read(self) -> tuple[bytes, float]:
        """(bytes, arrival of the last of them on perf_counter's clock)."""
        if not self.stamped:
            return self.sock.recv(RECV_BYTES), time.perf_counter()
        data, ancillary, _, _ = self.sock.recvmsg(RECV_BYTES, socket.CMSG_SPACE(16))
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                sec, nsec = struct.unpack_from("qq", value)
                return data, sec + nsec * 1e-9 - self.clock
        return data, time.perf_counter()  # nothing new arrived (the connection's end)

    def send(self) -> bool:
        """Sends what the socket takes; True once the whole request is out."""
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ConnectionError(err, f"cannot connect: {os.strerror(err)} ({errno.errorcode.get(err, err)})")
        self.pending = self.pending[self.sock.send(self.pending):]
        return not self.pending

    def receive(self, where: str) -> bool:
        """Reads what is there; False once the stream is over ([DONE] or the server closed: self.end set)."""
        data, now = self._read()
        if not data:
            if self.sse is None:
                raise ConnectionError(f"{where} closed the connection without an HTTP response")
            self.keep, self.end = False, now
            return False
        if self.sse is None:  # still in the response head
            self.head += data
            at = self.head.find(b"\r\n\r\n")
            if at < 0:
                return True
            head, data = self.head[:at + 4].lower(), self.head[at + 4:]
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                raise RuntimeError(f"HTTP {status} from {where}: {self.head.decode(errors='replace')[:400]}")
            chunked = b"transfer-encoding: chunked" in head
            self.sse = _SSEReader(chunked)
            self.keep = chunked and b"connection: close" not in head  # its end is the chunked body's end
        if self.first is not None:  # only the end matters now: kept as it comes, tallied in one go at the end
            tail = self.rest[-1][-8:] if self.rest else b""
            self.rest.append(data)
            if self.sse.chunked:  # the chunked body's last chunk follows the one that carried [DONE]
                going = not (tail + data).endswith(b"\r\n0\r\n\r\n")
            else:
                going = b"[DONE]" not in tail + data
            if not going:
                self.end = now
            return going
        for event in self.sse.feed(data):
            event = event[5:].strip()
            if event == b"[DONE]" and not self.sse.chunked:
                self.end = now
                return False
            if event.startswith(b'{"error"') or b'"usage":{' in event:
                obj = json.loads(event)
                if "error" in obj:
                    raise RuntimeError(f"error event from {where}: {json.dumps(obj['error'])[:300]}")
                self.tokens = obj["usage"].get("completion_tokens")
            if TEXT in event and TEXT + b'"' not in event:
                self.chunks += 1
                if self.first is None:
                    self.first = now
                    self.quiet = self.stamped and self.low_water(QUIET_RCVLOWAT)
        if self.sse.done:  # the chunked body's end
            self.end = now
        return not self.sse.done

    def low_water(self, nbytes: int) -> bool:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
        except (OSError, AttributeError):  # no SO_RCVLOWAT: read as it comes
            return False
        return True

    def result(self, where: str) -> dict:
        if self.rest:  # the tally is not the server's time: `end` was taken before
            more, usage_tokens, error, _ = tally(self.sse.feed_block(b"".join(self.rest)))
            if error is not None:
                raise RuntimeError(f"error event from {where}: {json.dumps(error)[:300]}")
            self.chunks += more
            self.tokens = usage_tokens if usage_tokens is not None else self.tokens
        return {"start": self.start, "first": self.first or self.end, "end": self.end,
                "tokens": self.chunks if self.tokens is None else self.tokens, "chunks": self.chunks,
                "connected": not self.reused}  # a TCP connection was opened for this request


def stream_requests(base_url: str, path: str, bodies: list[dict], timeout: float = 600.0,
                    pool: Pool | None = None) -> list[dict]:
    """POST every body at once as a streaming request; -> per request {start, first, end, tokens, chunks, connected}, in
    order. `first` is the arrival of the first chunk with non-empty text (a token that is only part of a UTF-8
    character is held back by both servers), `end` that of the body's last bytes. With a `pool`, connections are
    taken from it and given back kept alive. Raises on an HTTP error, an error event, or after `timeout` s."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    where = base_url + path
    streams: list[_Stream] = []
    selector = selectors.DefaultSelector()
    deadline = time.perf_counter() + timeout
    close = "" if pool is not None else "Connection: close\r\n"
    try:
        for body in bodies:
            payload = json.dumps(body).encode()
            request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                       f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n{close}\r\n"
                       ).encode() + payload
            streams.append(_Stream(host, int(port), request, pool.take() if pool is not None else None))
            selector.register(streams[-1].sock, selectors.EVENT_WRITE, streams[-1])
        left, next_poll = len(streams), time.perf_counter() + POLL_INTERVAL

        def read(s: _Stream) -> None:
            nonlocal left
            try:
                going = s.receive(where)
            except BlockingIOError:  # a poll found nothing new
                return
            except (ConnectionError, OSError):
                if not (s.reused and not s.head):
                    raise
                going = None  # a kept-alive connection closed by the server before it read the request
            if going is None:
                selector.unregister(s.sock)
                s.reconnect()
                selector.register(s.sock, selectors.EVENT_WRITE, s)
            elif not going:
                selector.unregister(s.sock)
                if s.keep and pool is not None and (s.first is None or s.low_water(1)):
                    pool.idle.append(s.sock)
                else:
                    s.sock.close()
                left -= 1

        while left:
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"{left} of {len(streams)} streams from {where} unfinished after {timeout:g} s")
            for key, events in selector.select(max(0.0, min(next_poll, deadline) - now)):
                s = key.data
                if events & selectors.EVENT_WRITE:
                    if s.send():
                        selector.modify(s.sock, selectors.EVENT_READ, s)
                elif s.end is None:
                    read(s)
            if time.perf_counter() >= next_poll:  # the quiet streams: their kernel stamps time what they bring
                next_poll = time.perf_counter() + POLL_INTERVAL
                for s in streams:
                    if s.quiet and s.end is None:
                        read(s)
        return [s.result(where) for s in streams]
    finally:
        for s in streams:
            if s.end is None:
                s.sock.close()
        selector.close()


def run_round(base_url: str, model: str, prompts: list[list[int]], max_tokens: int,
              temperature: float = 1.0, pool: Pool | None = None) -> list[dict]:
    """All prompts sent at once as concurrent streaming /v1/completions requests (on the `pool`'s kept-alive
    connections where given); each request's timings."""
    bodies = [{"model": model, "prompt": p, "max_tokens": max_tokens, "ignore_eos": True, "temperature": temperature,
               "top_p": 1.0, "top_k": 0, "min_p": 0.0,  # plain sampling: top_k 0 = off in both servers
               "stream": True, "stream_options": {"include_usage": True}} for p in prompts]
    return stream_requests(base_url, "/v1/completions", bodies, pool=pool)


def summarize(rounds: list[list[dict]], n: int) -> dict:
    """Aggregate tokens/s of a round = its tokens / wall clock from the first send to the last byte. Reports the
    best round (the least disturbed on a shared machine), its TTFT p50 / p99 / mean, every round's aggregate and
    TTFT p50, and the token count of every request of every round."""
    def tps(reqs):
        return sum(r["tokens"] for r in reqs) / (max(r["end"] for r in reqs) - min(r["start"] for r in reqs))

    def ttft(reqs):
        return [1000 * (r["first"] - r["start"]) for r in reqs]

    best = max(rounds, key=tps)
    return {f"agg_tps@{n}": tps(best), f"ttft_p50_ms@{n}": percentile(ttft(best), 50),
            f"ttft_p99_ms@{n}": percentile(ttft(best), 99), f"ttft_mean_ms@{n}": sum(ttft(best)) / len(best),
            f"rounds_tps@{n}": [tps(reqs) for reqs in rounds],
            f"rounds_ttft_p50_ms@{n}": [percentile(ttft(reqs), 50) for reqs in rounds],
            f"completion_tokens@{n}": [r["tokens"] for reqs in rounds for r in reqs],
            **({f"rounds_connections@{n}": [sum(r["connected"] for r in reqs) for reqs in rounds]}
               if all("connected" in r for reqs in rounds for r in reqs) else {})}  # over HTTP: connections opened
