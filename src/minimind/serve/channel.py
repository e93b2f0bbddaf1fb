"""The per-request channel between the engine's step loop and a handler (OutputChannel), and the handle a
handler holds (RequestHandle): iterate its outputs, or subscribe a callback that runs where the engine hands them
over (engine_client.AsyncEngine._deliver)."""
from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from ..engine import RequestOutput

if TYPE_CHECKING:
    from .engine_client import AsyncEngine


class EngineDead(RuntimeError):
    pass


class OutputChannel:
    """One request's outputs: appended on its event loop (AsyncEngine._put_all), read by its handler or passed
    straight to a subscriber (RequestHandle.push_to). A deque and one waiter future; asyncio.Queue does the same
    with its size bound, putters and join accounting on every item, which runs once per streamed token.
    final_only: the handler answers in one piece, so only the final output is delivered (a hand-over per step
    costs the event loop CPU that it takes from the engine's threads)."""

    __slots__ = ("direct", "final_only", "in_flight", "items", "loop", "plain", "sink", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, final_only: bool = False):
        self.loop, self.items, self.waiter, self.final_only = loop, deque(), None, final_only
        self.sink = None  # a subscriber gets every item at once instead of a reader's get()
        # the engine's lock guards these two: a subscriber that may run on the engine's thread, which gets an
        # output there only while no earlier one is still on its way through the event loop (keeps the order)
        self.direct = None
        self.in_flight = 0
        # with direct: (SocketWriter, ChunkTemplate) of a stream whose plain text deltas the engine's thread writes
        # itself (AsyncEngine._deliver), skipping the subscriber's render for the most common chunk
        self.plain = None

    def put(self, item) -> None:
        if self.sink is not None:
            self.sink(item)
            return
        self.items.append(item)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():  # done: its reader was cancelled
            waiter.set_result(None)

    def subscribe(self, sink) -> None:
        """sink(item) runs on the event loop for every item, first those already queued."""
        while self.items:
            sink(self.items.popleft())
        self.sink = sink

    async def get(self):
        while not self.items:
            self.waiter = self.loop.create_future()
            await self.waiter
        return self.items.popleft()


def engine_dead(exc: BaseException) -> EngineDead:
    dead = EngineDead(f"engine step failed: {type(exc).__name__}: {exc}")
    dead.__cause__ = exc
    return dead


class RequestHandle:
    """Async iterator of one request's RequestOutput updates; `abort()` frees its slot at the next step."""

    def __init__(self, engine: AsyncEngine, request_id: str, prompt_token_ids: list[int], stream: OutputChannel):
        self.engine, self.request_id, self.prompt_token_ids = engine, request_id, prompt_token_ids
        self._stream = stream
        self.final: RequestOutput | None = None

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        # a coroutine, not an async generator: one frame less per streamed token
        if self.final is not None:
            raise StopAsyncIteration
        item = await self._stream.get()
        if isinstance(item, BaseException):
            raise engine_dead(item)
        if item.finished:
            self.final = item
        return item

    def push_to(self, on_output, on_error, any_thread: bool = False, plain=None) -> None:
        """Instead of iterating: on_output(RequestOutput) for every output (the last has `finished`), or
        on_error(EngineDead) once, called on the event loop right where the engine's step hands them over
        (sse.SSEResponse renders and sends a token there, without resuming a task). Both must not raise.
        any_thread: they may also be called on the engine's thread, right after its step (in order, never two at
        once): a streamed token then costs the event loop nothing (serve/socket_writer.py).
        plain: with any_thread, (SocketWriter, ChunkTemplate) for outputs that are not finished and only bring new
        text (one completion, no logprobs): the engine's thread writes template(text) to the writer itself, the
        bytes the subscriber would render, without calling it; stop_plain() ends that."""

        def deliver(item):
            if isinstance(item, BaseException):
                on_error(engine_dead(item))
                return
            if item.finished:
                self.final = item
            on_output(item)

        self._stream.subscribe(deliver)
        if any_thread:
            with self.engine._lock:
                self._stream.direct, self._stream.plain = deliver, plain

    def stop_plain(self) -> None:
        """Every later output goes to the subscriber (which drops them once its response has failed)."""
        self._stream.plain = None

    async def result(self) -> RequestOutput:
        async for _ in self:
            pass
        return self.final

    def abort(self) -> None:
        if self.final is None:
            self.engine.abort(self.request_id)
