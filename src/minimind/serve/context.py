"""ServingContext: everything a handler needs (served engines, tokenizer, auth), passed explicitly, never global."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import orjson
from fastapi import Request
from starlette.responses import Response

from .engine_client import AsyncEngine, RequestHandle
from .errors import APIError, error_body
from .formatting import TokenText


@dataclass
class ServingContext:
    engines: dict[str, AsyncEngine]  # served model id -> engine; the first is the base model
    api_key: str | None = None
    metrics: object | None = None
    guided: object | None = None  # GuidedDecoding when a grammar library is installed
    token_texts: dict[int, TokenText] = field(default_factory=dict)

    @property
    def base_model(self) -> str:
        return next(iter(self.engines))

    def engine_for(self, model: str | None) -> tuple[str, AsyncEngine]:
        if model is None or model == "":
            return self.base_model, self.engines[self.base_model]
        if model not in self.engines:
            served = ", ".join(f"`{m}`" for m in self.engines)
            raise APIError(404, f"The model `{model}` does not exist. Served models: {served}.", param="model",
                           code="model_not_found")
        return model, self.engines[model]

    def token_text(self, engine: AsyncEngine) -> TokenText:
        key = id(engine.tokenizer)
        if key not in self.token_texts:
            self.token_texts[key] = TokenText(engine.tokenizer)
        return self.token_texts[key]


def sse(obj) -> bytes:
    """One server-sent event. orjson: UTF-8 without escapes, compact, several times faster than json.dumps (this
    runs once per streamed token on the event loop)."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
RAW_SEND = "minimind.raw_send"  # scope key of the HTTP server's own send (openai_server.ServingApp)


class SSEResponse(Response):
    """text/event-stream from an async iterator of bytes: one ASGI send per chunk, nothing else. Starlette's
    StreamingResponse runs the stream in an anyio task group beside a disconnect listener, ~40 % of the event
    loop's time per streamed token in a profile at 8 clients; the handlers here watch for disconnects themselves
    (watch_disconnect aborts the request, which ends the iterator)."""

    media_type = "text/event-stream"

    def __init__(self, chunks, headers: dict | None = None):
        self.chunks, self.status_code, self.background = chunks, 200, None
        self.init_headers(headers)

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        body_send = scope.get(RAW_SEND, send)  # the middlewares only watch the start: chunks skip their wrappers
        # The body runs as a task of its own: each token then resumes this short stack, not the ~20 frames of the
        # server and middleware coroutines this call is nested in. Cancelling this call cancels the task.
        await asyncio.ensure_future(self._send_body(body_send))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_body(self, body_send) -> None:
        try:
            async for chunk in self.chunks:
                await body_send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await self.chunks.aclose()  # its finally (abort, watcher cancel) runs even if a send failed


def stream_error(exc: BaseException) -> str:
    """An error after the 200 headers went out: an SSE error event (vLLM's shape), then the caller sends [DONE]."""
    if isinstance(exc, APIError):
        return sse(exc.body())
    return sse(error_body(500, f"{type(exc).__name__}: {exc}"))


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def watch_disconnect(request: Request, handle: RequestHandle) -> asyncio.Task:
    """Abort the request (freeing its KV slot at the next engine step) as soon as the client goes away, even
    while it still waits in the queue and nothing is being sent to it."""

    async def watch():
        await _wait_disconnect(request)
        handle.abort()

    return asyncio.create_task(watch())


async def final_output(request: Request, handle: RequestHandle):
    """Wait for a non-streamed request's final output; a client that leaves aborts it, and so does any error."""
    watcher = watch_disconnect(request, handle)
    try:
        return await handle.result()
    finally:
        watcher.cancel()
        handle.abort()
