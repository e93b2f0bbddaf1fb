"""Server-sent events: a streamed response renders each engine output into SSE chunks the moment the engine hands
it over, and sends them without a task switch.

Per streamed token the event loop used to resume a chain of coroutines (a task, the body's async generator, the
handle's iterator, the channel's future) before the chunk reached the socket. Here the handler is a plain
*renderer* (head / render / tail, returning bytes) and SSEResponse subscribes to the requests' channels: the
engine's hand-over calls render and writes the bytes right there, on the engine's own thread where the
connection allows it (socket_writer.py), else on the event loop. On 2 CPUs every microsecond of event-loop CPU
is taken from the engine's threads (docs/benchmarks.md, "Where the HTTP cost goes").
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from functools import partial
from typing import Protocol

import orjson
from starlette.responses import Response

from .context import watch_disconnect
from .errors import APIError, error_body
from .socket_writer import SocketWriter

SSE_DONE = b"data: [DONE]\n\n"
RAW_SEND = "minimind.raw_send"  # scope key of the HTTP server's own send (openai_server.ServingApp)


def sse(obj) -> bytes:
    """One server-sent event. orjson: UTF-8 without escapes, compact, several times faster than json.dumps."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class ChunkTemplate:
    """sse(make(text)) for any string `text`, without building and serializing the whole object each time: the
    event is rendered once by sse() itself around a marker string and split there, so the bytes are the same as
    the object's. A plain text delta is most of a stream's chunks (~1.9 -> 0.35 us each, warm)."""

    _MARKER = "\x00minimind-text\x00"

    def __init__(self, make):
        whole, marker = sse(make(self._MARKER)), orjson.dumps(self._MARKER)
        at = whole.index(marker)
        self.head, self.tail = whole[:at], whole[at + len(marker):]

    def __call__(self, text: str) -> bytes:
        return self.head + orjson.dumps(text) + self.tail


def stream_error(exc: BaseException) -> bytes:
    """An error after the 200 headers went out: an SSE error event (vLLM's shape), then [DONE]."""
    if isinstance(exc, APIError):
        return sse(exc.body())
    return sse(error_body(500, f"{type(exc).__name__}: {exc}"))


class Renderer(Protocol):
    def head(self) -> list[bytes]: ...  # before any output (role chunks, echoed prompts)

    def render(self, k: int, out) -> list[bytes]: ...  # one RequestOutput of handle k

    def tail(self) -> list[bytes]: ...  # after every handle finished (the usage chunk)

    # optional: the ChunkTemplate that render(k, out) would apply to every output of handle k that is not finished
    # and only brings new text, or None when it may render such outputs otherwise (logprobs, several choices)
    # def plain(self, k: int) -> ChunkTemplate | None: ...


async def _resume(coro, awaited) -> None:
    """Finish a coroutine that was started by hand and is suspended on `awaited` (what a Task would have been
    handed): wait until that is done, then resume it, as asyncio's Task does."""
    try:
        while True:
            if awaited is None:  # a bare `yield` (asyncio.sleep(0))
                await asyncio.sleep(0)
            else:
                await asyncio.wait([awaited])  # only wait: the coroutine takes the result itself when resumed
            awaited = coro.send(None)
    except StopIteration:
        return
    finally:
        coro.close()  # no-op once finished; on cancellation it runs the coroutine's own finally blocks


class ChunkWriter:
    """Body chunks in order, each sent without a task switch: an ASGI `send` is a coroutine, but uvicorn's
    completes without waiting unless the client stopped reading (its socket buffer is full). So it is driven by
    hand, and only a send that does wait continues as a task, with the chunks after it queued behind it. Any other
    server's send (by_hand=False; e.g. an anyio-based one, which needs to run inside a task) always goes through
    a task, in order."""

    def __init__(self, send, by_hand: bool = True):
        self.send, self.by_hand = send, by_hand
        self.backlog: deque[bytes] | None = None  # not None while a send waits
        self.task: asyncio.Task | None = None
        self.error: BaseException | None = None

    @staticmethod
    def drives_by_hand(send) -> bool:
        """uvicorn's own send (plain asyncio): safe to drive outside a task."""
        return type(getattr(send, "__self__", None)).__module__.startswith("uvicorn.")

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        if self.backlog is not None:
            self.backlog.append(data)
            return
        if not self.by_hand:
            self.backlog = deque([data])
            self.task = asyncio.ensure_future(self._drain(None, None))
            return
        coro = self.send({"type": "http.response.body", "body": data, "more_body": True})
        try:
            awaited = coro.send(None)
        except StopIteration:
            return
        except BaseException as exc:
            self.error = exc
            raise
        self.backlog = deque()
        self.task = asyncio.ensure_future(self._drain(coro, awaited))

    async def _drain(self, coro, awaited) -> None:
        try:
            if coro is not None:
                await _resume(coro, awaited)
            while self.backlog:
                await self.send({"type": "http.response.body", "body": self.backlog.popleft(), "more_body": True})
            self.backlog = None
        except Exception as exc:  # noqa: BLE001 - raised again by the next write or flush
            self.error = exc

    async def flush(self) -> None:
        """Wait until every chunk was handed to the server."""
        if self.task is not None:
            await self.task
        if self.error is not None:
            raise self.error


class SSEResponse(Response):
    """text/event-stream of the engine outputs of `handles`, rendered by `renderer`: the head, every output of
    every handle as it comes, the tail, then [DONE]; an error after the headers went out becomes an error event.
    A client that disconnects aborts the requests (their KV slots are freed at the next step); so does any end."""

    media_type = "text/event-stream"

    def __init__(self, renderer: Renderer, handles: list, headers: dict | None = None):
        self.renderer, self.handles = renderer, handles
        self.status_code, self.background = 200, None
        self.init_headers(headers)

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        raw_send = scope.get(RAW_SEND, send)  # chunks skip the middlewares' send wrappers
        writer = ChunkWriter(raw_send, ChunkWriter.drives_by_hand(raw_send))
        watcher = watch_disconnect(receive, *self.handles)
        closing = b""  # the tail (or an error event) and [DONE] go out with the end of the body: one write
        direct = None
        try:
            if head := self.renderer.head():
                writer.write(b"".join(head))
            if writer.backlog is None:  # else the socket must wait for what the server still holds
                direct = SocketWriter.of(raw_send, self.handles[0].engine.sender)
            await self._push_outputs(direct or writer, any_thread=direct is not None)
            closing = b"".join(self.renderer.tail())
        except Exception as exc:  # noqa: BLE001 - headers are out: report any failure in-band
            closing = stream_error(exc)
        finally:
            watcher.cancel()
            for h in self.handles:
                h.abort()  # no-op once finished
            if direct is not None:
                direct.close()
        await writer.flush()  # raises if a send failed: then nothing more can go out
        await send({"type": "http.response.body", "body": closing + SSE_DONE, "more_body": False})

    async def _push_outputs(self, writer, any_thread: bool) -> None:
        """Render and write every output where the engine hands it over (on the event loop, or with any_thread
        on the engine's thread too: then `writer` is a SocketWriter); returns once all handles finished."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        lock = threading.Lock()  # several handles may be handed over on both threads at once
        state = {"left": len(self.handles), "over": False}

        def end(exc=None):  # on the event loop
            if done.done():
                return
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

        def post_end(exc):
            try:
                loop.call_soon_threadsafe(end, exc)
            except RuntimeError:  # the event loop is closed: nobody waits any more
                pass

        def stop(exc=None):  # on any thread; under the lock
            state["over"] = True
            for h in self.handles:  # nothing more may reach the socket, plain chunks included
                h.stop_plain()
            if any_thread:  # inside the engine's hand-over: once the step's chunks are sent
                writer.sender.later(partial(post_end, exc))
            else:
                post_end(exc)

        def deliver(k, out):
            with lock:
                if state["over"]:  # failed before: nothing more goes out
                    return
                try:
                    chunks = self.renderer.render(k, out)
                    if chunks:  # a token's text chunk and its choice's finish chunk: one write
                        writer.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                except Exception as exc:  # noqa: BLE001 - ends the stream with an error event
                    stop(exc)
                    return
                if out.finished:
                    state["left"] -= 1
                    if state["left"] == 0:
                        stop()

        def fail(exc):
            with lock:
                if not state["over"]:
                    stop(exc)

        plain = getattr(self.renderer, "plain", None)
        for k, h in enumerate(self.handles):
            # one handle only: the engine's thread then writes its plain chunks without taking the lock above
            template = plain(k) if plain is not None and any_thread and len(self.handles) == 1 else None
            h.push_to(partial(deliver, k), fail, any_thread=any_thread,
                      plain=None if template is None else (writer, template))
        await done
