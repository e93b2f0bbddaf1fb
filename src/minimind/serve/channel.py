"""What a handler reads its requests' outputs from (OutputCollector), and the handle it holds (RequestHandle).

A collector keeps at most one pending output per request: when the reader has not taken the previous one yet, the
new one is merged into it, so a slow client costs one bigger chunk later, never a queue that grows with every
token, and the engine never waits for a reader.
"""
from __future__ import annotations

import asyncio

from ..engine import RequestOutput


class EngineDead(RuntimeError):
    pass


def merge(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """`new` with the deltas of `old` (an output its reader never took) in front of its own. Its cumulative fields
    (text, token_ids, logprobs, finish reason, metrics, ...) are already the newest; a completion that only `old`
    mentions is kept."""
    mine = {o.index: o for o in new.outputs}
    for o in old.outputs:
        n = mine.get(o.index)
        if n is None:
            new.outputs.append(o)
        else:
            n.delta_text = o.delta_text + n.delta_text
            n.delta_token_ids = o.delta_token_ids + n.delta_token_ids
    if len(new.outputs) > len(mine):
        new.outputs.sort(key=lambda o: o.index)
    return new


class OutputCollector:
    """The pending outputs of one response's requests (key k = the request's place in the response), read by one
    handler on `loop`; put() and get() run on that loop. final_only: the response is answered in one piece, so the
    engine hands over only final outputs (each hand-over costs the event loop CPU it takes from the engine)."""

    __slots__ = ("error", "final_only", "loop", "pending", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, final_only: bool = False):
        self.loop, self.final_only = loop, final_only
        self.pending: dict[int, RequestOutput] = {}  # k -> the output not yet read (insertion order = arrival)
        self.waiter: asyncio.Future | None = None
        self.error: BaseException | None = None

    def put(self, k: int, out: RequestOutput) -> None:
        old = self.pending.get(k)
        self.pending[k] = out if old is None else merge(old, out)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """The engine failed: the reader gets EngineDead once it has read what is pending."""
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():  # done: its reader was cancelled
            waiter.set_result(None)

    async def get(self) -> tuple[int, RequestOutput]:
        """The oldest pending (k, output): at once when there is one (no task switch), else when one comes."""
        while not self.pending:
            if self.error is not None:
                raise EngineDead(f"engine step failed: {type(self.error).__name__}: {self.error}") from self.error
            self.waiter = self.loop.create_future()
            await self.waiter
        k = next(iter(self.pending))
        return k, self.pending.pop(k)


class RequestHandle:
    """One engine request of a response: its id and prompt, its final output once read, abort(). Iterating it
    gives its outputs when it is the only request of its collector."""

    def __init__(self, engine, request_id: str, prompt_token_ids: list[int], collector: OutputCollector):
        self.engine, self.request_id, self.prompt_token_ids = engine, request_id, prompt_token_ids
        self.collector = collector
        self.final: RequestOutput | None = None

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.final is not None:
            raise StopAsyncIteration
        _, out = await self.collector.get()
        if out.finished:
            self.final = out
        return out

    def abort(self) -> None:
        """Frees its KV slot at the next step; nothing once it finished."""
        if self.final is None:
            self.engine.abort(self.request_id)
