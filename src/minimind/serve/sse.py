"""Server-sent events: a streamed response is an async generator over its requests' OutputCollector that renders
each output into bytes, sent by Starlette's StreamingResponse (so every middleware and any ASGI server see it).
The API shapes differ only in their renderer: head/render/tail/error/end (StreamRenderer is the OpenAI one).
"""
from __future__ import annotations

import time

import orjson
from starlette.responses import StreamingResponse

from .errors import APIError, error_body


def sse(obj) -> bytes:
    """One server-sent event. orjson: UTF-8 without escapes, compact, several times faster than json.dumps."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def named_sse(obj: dict) -> bytes:
    """One server-sent event named after its `type` (`event: T` then `data: {...}`), the framing of the Responses
    and Anthropic Messages streams."""
    return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u


class ChunkTemplate:
    """sse(make(text)) for any string `text`, without building and serializing the whole object each time (a
    plain text delta is most of a stream's chunks): rendered once by sse() around a marker and split there."""

    _MARKER = "\x00minimind-text\x00"

    def __init__(self, make):
        whole, marker = sse(make(self._MARKER)), orjson.dumps(self._MARKER)
        at = whole.index(marker)
        self.head, self.tail = whole[:at], whole[at + len(marker):]

    def __call__(self, text: str) -> bytes:
        return self.head + orjson.dumps(text) + self.tail


class StreamRenderer:
    """The chunks of one streamed response: a subclass's head() before any output and render(k, out) for each
    output of handle k, then tail() once every handle finished. The base has what the API shapes share: the chunk
    envelope with usage as stream_options asks, templates for plain text chunks, the closing usage chunk."""

    object = ""  # the chunks' `object`

    def __init__(self, req, handles: list, response_id: str, model_id: str):
        self.handles, self.id, self.model_id, self.created = handles, response_id, model_id, int(time.time())
        opts = req.stream_options
        self.include_usage = bool(opts and opts.include_usage)
        self.continuous = bool(opts and opts.continuous_usage_stats)
        self.token_text = handles[0].engine.token_text
        self.prompt_tokens = sum(len(h.prompt_token_ids) for h in handles)
        self.generated: dict[int, int] = {}  # choice index -> tokens generated so far
        self.done: set[int] = set()  # choice indexes whose finish chunk went out
        self.sent_lp: dict[int, int] = {}  # choice index -> logprobs sent so far
        self.templates: dict[int, ChunkTemplate] = {}  # choice index -> its plain text chunk

    def envelope(self, choices: list) -> dict:
        c = {"id": self.id, "object": self.object, "created": self.created, "model": self.model_id,
             "choices": choices}
        if self.include_usage:
            c["usage"] = usage(self.prompt_tokens, sum(self.generated.values())) if self.continuous else None
        return c

    def chunk(self, choice: dict) -> bytes:
        return sse(self.envelope([choice]))

    def text_chunk(self, index: int, text: str, choice) -> bytes:
        """chunk(choice(index, text)) from a template (not with continuous usage, which changes every chunk)."""
        template = self.templates.get(index)
        if template is None:
            template = self.templates[index] = ChunkTemplate(lambda t: self.envelope([choice(index, t)]))
        return template(text)

    def choices(self, k: int, out, n: int = 1):
        """(choice index, output) of each completion of handle k's output `out` that had not finished yet: a
        request's outputs repeat its finished completions until the last one finishes."""
        for o in out.outputs:
            i = k * n + o.index
            if i not in self.done:
                self.generated[i] = len(o.token_ids)
                if o.finished:
                    self.done.add(i)
                yield i, o

    def new_logprobs(self, index: int, o) -> list | None:
        """The logprobs of output `o` not sent yet (None when there are none)."""
        sent = self.sent_lp.get(index, 0)
        if o.logprobs is None or len(o.logprobs) <= sent:
            return None
        self.sent_lp[index] = len(o.logprobs)
        return o.logprobs[sent:]

    def error(self, exc: Exception) -> bytes:
        """A failure after the headers went out, as one in-band event (vLLM's shape)."""
        return sse(exc.body() if isinstance(exc, APIError) else error_body(500, f"{type(exc).__name__}: {exc}"))

    def end(self) -> bytes:
        return b"data: [DONE]\n\n"

    def tail(self) -> list[bytes]:
        if not self.include_usage:
            return []
        body = self.envelope([])
        cached = sum(h.final.num_cached_tokens for h in self.handles if h.final is not None)
        body["usage"] = usage(self.prompt_tokens, sum(self.generated.values()), cached)
        return [sse(body)]


async def stream_body(renderer):
    """The body of a streamed response, for any API's framing: renderer.head() before any output, renderer.render(k,
    out) for every output of every handle as it comes (they share one collector; handle k's outputs have key k),
    then renderer.tail(), or renderer.error(exc) for a failure once the headers are out, then renderer.end().
    However it ends (a client that disconnects cancels it), its requests are aborted."""
    handles = renderer.handles
    collector = handles[0].collector
    closing = b""  # the tail (or an error event) goes out with the end marker: one chunk
    try:
        if head := renderer.head():
            yield b"".join(head)
        left = len(handles)
        while left:
            k, out = await collector.get()
            if out.finished:
                handles[k].final = out
                left -= 1
            chunks = renderer.render(k, out)
            if chunks:  # a token's text chunk and its choice's finish chunk: one send
                yield chunks[0] if len(chunks) == 1 else b"".join(chunks)
        closing = b"".join(renderer.tail())
    except Exception as exc:  # noqa: BLE001 - headers are out: report any failure in-band
        closing = renderer.error(exc)
    finally:
        for h in handles:
            h.abort()  # no-op once finished
    yield closing + renderer.end()


class SSEResponse(StreamingResponse):
    """StreamingResponse of stream_body(renderer) that closes the body however the response ends: a server whose
    `send` raises once the client has gone (ASGI 2.4) leaves the generator at a `yield`, and its `finally` (the
    aborts) must run now, not whenever the generator is garbage-collected. The renderer's `media_type` names the
    framing (SSE by default; Ollama's API streams NDJSON)."""

    def __init__(self, renderer):
        media_type = getattr(renderer, "media_type", "text/event-stream")
        super().__init__(stream_body(renderer), media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
