"""ServingContext: everything a handler needs (served engines, tokenizer, auth), passed explicitly, never global."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from ..engine import RequestOutput
from .engine_client import AsyncEngine, RequestHandle
from .errors import APIError
from .formatting import token_text_of


@dataclass
class ServingContext:
    engines: dict[str, AsyncEngine]  # served model id -> engine; the first is the base model
    api_key: str | None = None
    metrics: object | None = None
    guided: object | None = None  # GuidedDecoding when a grammar library is installed
    token_texts: dict[int, Callable[[int], str]] = field(default_factory=dict)  # id(tokenizer) -> token_text_of

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

    def token_text(self, engine: AsyncEngine) -> Callable[[int], str]:
        key = id(engine.tokenizer)
        if key not in self.token_texts:
            self.token_texts[key] = token_text_of(engine.tokenizer)
        return self.token_texts[key]

    def constrain(self, engine: AsyncEngine, params, response_format, unavailable: str) -> None:
        """Add the grammar of a json_object / json_schema response_format to params (a 400 with `unavailable` when
        no grammar library is installed)."""
        if response_format is None or response_format.type == "text":
            return
        if self.guided is None:
            raise APIError(400, unavailable, param="response_format")
        self.guided.attach(engine, params, response_format)


async def final_outputs(request: Request, handles: list[RequestHandle]) -> list[RequestOutput]:
    """The final outputs of a non-streamed response's requests (they share one collector; handle k's outputs have
    key k). They are aborted on any error, and as soon as the client goes away, even while they still wait in the
    queue: nothing is sent before the answer is ready, so nothing else would notice."""

    async def watch_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for h in handles:
            h.abort()

    watcher = asyncio.create_task(watch_disconnect())
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
