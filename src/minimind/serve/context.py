"""ServingContext: everything a handler needs (served engines, tokenizer, auth), passed explicitly, never global."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Request

from ..engine import RequestOutput
from .engine_client import AsyncEngine, RequestHandle
from .errors import APIError
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


def watch_disconnect(receive, *handles: RequestHandle) -> asyncio.Task:
    """Abort the requests (freeing their KV slots at the next engine step) as soon as the client goes away, even
    while they still wait in the queue. For answers in one piece: until it is ready, nothing is sent, so nothing
    else would notice. receive: the request's ASGI receive."""

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        for h in handles:
            h.abort()

    return asyncio.create_task(watch())


async def final_outputs(request: Request, handles: list[RequestHandle]) -> list[RequestOutput]:
    """The final outputs of a non-streamed response's requests (they share one collector; handle k's outputs have
    key k); a client that leaves aborts them, and so does any error."""
    watcher = watch_disconnect(request.receive, *handles)
    collector = handles[0].collector
    try:
        left = len(handles)
        while left:
            k, out = await collector.get()  # only final outputs are handed over for these
            if out.finished and handles[k].final is None:
                handles[k].final = out
                left -= 1
        return [h.final for h in handles]
    finally:
        watcher.cancel()
        for h in handles:
            h.abort()


async def final_output(request: Request, handle: RequestHandle) -> RequestOutput:
    return (await final_outputs(request, [handle]))[0]
