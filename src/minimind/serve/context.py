"""ServingContext: everything a handler needs (served engines, grammars, auth), passed explicitly, never global;
and the steps every generation endpoint shares: checked engine requests, their submission, their final outputs."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Request

from ..engine import RequestOutput, SamplingParams
from .engine_client import AsyncEngine, RequestHandle
from .errors import APIError
from .params import check_prompt, resolve_max_tokens, sampling_params
from .protocol import SamplingFields


@dataclass
class ServingContext:
    engines: dict[str, AsyncEngine]  # served model id -> engine; the first is the base model
    api_key: str | None = None
    metrics: object | None = None
    guided: object | None = None  # GuidedDecoding when a grammar library is installed

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

    def requests_for(self, engine: AsyncEngine, req: SamplingFields, prompts: list[list[int]], what: str,
                     max_tokens: int | None, logprobs: int | None, unavailable: str):
        """[(prompt ids, SamplingParams)] of each prompt, with every check that answers 4xx done now, before the
        response starts. unavailable: the 400 for a json response_format when no grammar library is installed."""
        vocab, fmt = engine.llm.config.vocab_size, req.response_format
        jobs: list[tuple[list[int], SamplingParams]] = []
        for ids in prompts:
            check_prompt(ids, vocab, what)
            budget = resolve_max_tokens(max_tokens, len(ids), engine.max_model_len, what)
            params = sampling_params(req, max_tokens=budget, vocab_size=vocab, logprobs=logprobs)
            if fmt is not None and fmt.type != "text":
                if self.guided is None:
                    raise APIError(400, unavailable, param="response_format")
                self.guided.attach(engine, params, fmt)
            jobs.append((ids, params))
        return jobs


def submit(engine: AsyncEngine, jobs: list, base_id: str, stream: bool) -> list[RequestHandle]:
    """One engine request per job, all read through one collector (handle k's outputs have key k), so a response
    takes its prompts' outputs as they come. All or none: a refused one aborts those already submitted."""
    handles: list[RequestHandle] = []
    try:
        for k, (ids, params) in enumerate(jobs):
            collector = handles[0].collector if handles else None
            handles.append(engine.submit(ids, params, f"{base_id}-{k}", stream=stream, collector=collector, k=k))
    except BaseException:
        for h in handles:
            h.abort()
        raise
    return handles


async def final_outputs(request: Request, handles: list[RequestHandle]) -> list[RequestOutput]:
    """The final outputs of a non-streamed response's requests. They are aborted on any error, and as soon as the
    client goes away, even while they still wait in the queue: nothing is sent before the answer is ready, so
    nothing else would notice."""

    async def watch_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for h in handles:
            h.abort()

    watcher = asyncio.create_task(watch_disconnect())
    try:
        left = len(handles)
        while left:
            k, out = await handles[0].collector.get()  # only final outputs are handed over for these
            if out.finished and handles[k].final is None:
                handles[k].final = out
                left -= 1
        return [h.final for h in handles]
    finally:
        watcher.cancel()
        for h in handles:
            h.abort()
