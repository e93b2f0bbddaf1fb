"""ServingContext: everything a handler needs (served engines, tokenizer, auth), passed explicitly, never global."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Request

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
    while they still wait in the queue and nothing is being sent. receive: the request's ASGI receive."""

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        for h in handles:
            h.abort()

    return asyncio.create_task(watch())


async def final_output(request: Request, handle: RequestHandle):
    """Wait for a non-streamed request's final output; a client that leaves aborts it, and so does any error."""
    watcher = watch_disconnect(request.receive, handle)
    try:
        return await handle.result()
    finally:
        watcher.cancel()
        handle.abort()
