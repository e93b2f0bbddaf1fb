"""Streamed chunks written to the clients' sockets by the engine's thread, one C call per step.

On 2 CPUs every microsecond spent per streamed token is taken from the engine's two OpenMP threads. Handed to the
event loop, a token cost ~35 us of loop CPU at 32 streams (a wake-up per step, the renderer, the ASGI send, the
transport), and the loop preempted an OpenMP thread whose partner then waited at the next barrier. Here the
engine's thread renders each token right after its step (sse.py) and the Sender sends the whole step's chunks in
one call into the C kernels (engine/kernels/sockets.c): the GIL released, split over the same two OpenMP threads
that just computed the step, so the second core sends half of them instead of spinning. The event loop does
nothing per token (docs/benchmarks.md, "Eleventh session").

Only for a plain-TCP uvicorn (httptools) connection whose response uses chunked transfer encoding, and only while
the transport itself has nothing buffered: then bytes sent to a duplicate of its socket arrive in order after
everything the transport wrote. A send that does not take a whole chunk (the client is not reading) hands the
rest, and every later chunk, to the transport on the event loop, which buffers them in order.
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import socket
import threading

import torch

from ..engine.fused import send_many_kernel

log = logging.getLogger("minimind.serve")


class Sender:
    """Collects what SocketWriters write on one thread between begin() and flush() (an engine step's hand-over)
    and sends it in one C call; callbacks queued with later() run after that send. One per AsyncEngine."""

    def __init__(self, send_many, threads: int):
        self.send_many, self.threads = send_many, threads
        self.thread: int | None = None  # the thread inside a hand-over
        self.pending: dict[SocketWriter, list[bytes]] = {}
        self.after: list = []

    @classmethod
    def create(cls) -> Sender | None:
        """None where the C kernels cannot be built: streams then go through the event loop."""
        kernel = send_many_kernel()
        return None if kernel is None else cls(kernel, torch.get_num_threads())

    def begin(self) -> None:
        self.thread = threading.get_ident()

    def collecting(self) -> bool:
        return self.thread == threading.get_ident()

    def later(self, fn) -> None:
        """fn() now, or after this hand-over's chunks went out when called inside it."""
        if self.collecting():
            self.after.append(fn)
        else:
            fn()

    def flush(self) -> None:
        """Never raises: it runs on the engine's thread, which must go on stepping."""
        self.thread = None
        pending, self.pending = self.pending, {}
        after, self.after = self.after, []
        try:
            if pending:
                self._send(pending)
        except Exception as exc:  # those streams fail at their next write
            log.exception("sending streamed chunks failed")
            for w in pending:
                w.error = OSError(errno.EIO, f"sending failed: {exc}")
        for fn in after:
            try:
                fn()
            except Exception:
                log.exception("a callback after sending failed")

    def _send(self, pending: dict) -> None:
        writers = list(pending)
        for w in writers:
            w.lock.acquire()  # a close() on the event loop waits: no send on a closed (maybe reused) descriptor
        try:
            live = []
            for w, frames in pending.items():
                data = frames[0] if len(frames) == 1 else b"".join(frames)
                if w.sock is None or w.error is not None:
                    continue
                if w.queued:
                    w._queue(data)
                else:
                    live.append((w, data))
            n = len(live)
            if n:
                fds = (ctypes.c_int64 * n)(*(w.sock.fileno() for w, _ in live))
                bufs = (ctypes.c_char_p * n)(*(data for _, data in live))  # pointers into the bytes: no copy
                lens = (ctypes.c_int64 * n)(*(len(data) for _, data in live))
                sent = (ctypes.c_int64 * n)()
                self.send_many(n, fds, bufs, lens, sent, self.threads)
                for (w, data), k in zip(live, sent):
                    w._after_send(data, k)
        finally:
            for w in writers:
                w.lock.release()


class SocketWriter:
    """write(data) frames `data` as one HTTP/1.1 chunk and sends it (collected by the Sender inside an engine
    hand-over, else at once); callable on any thread, callers keep the order. close() (on the event loop, when
    the response ends) drops later writes. A write after the client went away raises its OSError."""

    def __init__(self, sock: socket.socket, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop,
                 sender: Sender):
        self.sock: socket.socket | None = sock
        self.transport, self.loop, self.sender = transport, loop, sender
        self.lock = threading.Lock()
        self.queued = False  # True once a chunk had to go through the transport: so does everything after it
        self.error: OSError | None = None

    @classmethod
    def of(cls, send, sender: Sender | None) -> SocketWriter | None:
        """A writer for the connection behind an ASGI server's own `send`, or None where it cannot be used."""
        cycle = getattr(send, "__self__", None)  # uvicorn's RequestResponseCycle (httptools)
        transport = getattr(cycle, "transport", None)
        if sender is None or transport is None or getattr(cycle, "chunked_encoding", None) is not True \
                or cycle.disconnected:
            return None
        if transport.get_extra_info("sslcontext") is not None or transport.get_write_buffer_size():
            return None  # TLS encrypts in the transport; buffered bytes must go out first
        raw = transport.get_extra_info("socket")
        if raw is None:
            return None
        try:  # a duplicate: its number cannot be reused by another connection until *we* close it
            # family/type/proto given: socket() would otherwise ask the kernel for each (three getsockopt calls)
            sock = socket.socket(raw.family, raw.type, raw.proto, os.dup(raw.fileno()))
        except OSError:
            return None
        return cls(sock, transport, asyncio.get_running_loop(), sender)

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        frame = b"%x\r\n%b\r\n" % (len(data), data)
        if self.sender.collecting():
            self.sender.pending.setdefault(self, []).append(frame)
            return
        with self.lock:
            if self.sock is None:
                return
            if self.queued:
                self._queue(frame)
                return
            try:
                sent = self.sock.send(frame, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            self._after_send(frame, sent)
        if self.error is not None:
            raise self.error

    def _after_send(self, frame: bytes, sent: int) -> None:
        """Under the lock: `sent` bytes of `frame` went out (negative: -errno; a full buffer sent nothing)."""
        if -sent in (errno.EAGAIN, errno.EWOULDBLOCK):
            sent = 0
        if sent < 0:
            self.error = OSError(-sent, os.strerror(-sent))
        elif sent < len(frame):
            self.queued = True
            self._queue(frame[sent:])

    def _queue(self, frame: bytes) -> None:
        try:
            self.loop.call_soon_threadsafe(self._write_later, frame)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
            self.error = OSError(errno.ECONNABORTED, "server shutting down")

    def _write_later(self, frame: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(frame)

    def close(self) -> None:
        with self.lock:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
