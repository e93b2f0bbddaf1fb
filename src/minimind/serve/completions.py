"""POST /v1/completions: raw text (or token id) prompts; several prompts run as several engine requests in the
same batch, choice index = prompt index * n + completion index (OpenAI's order)."""
from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import JSONResponse

from .chat import SSE_HEADERS
from .context import SSE_DONE, ServingContext, SSEResponse, sse, stream_error, watch_disconnect
from .errors import APIError
from .formatting import completion_logprobs, usage
from .params import check_prompt, completion_prompts, resolve_max_tokens, sampling_params
from .protocol import CompletionRequest, random_id


def prepare_completion(ctx: ServingContext, req: CompletionRequest):
    model_id, engine = ctx.engine_for(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options can only be set when stream is true", param="stream_options")
    prompts = completion_prompts(engine.tokenizer, req)
    vocab = engine.llm.config.vocab_size
    jobs = []
    for ids in prompts:
        check_prompt(ids, vocab, "prompt")
        if req.max_tokens is None:  # OpenAI's default of 16, clamped to what the context has left
            max_tokens = min(16, resolve_max_tokens(None, len(ids), engine.max_model_len, "prompt"))
        else:
            max_tokens = resolve_max_tokens(req.max_tokens, len(ids), engine.max_model_len, "prompt")
        params = sampling_params(req, max_tokens=max_tokens, vocab_size=vocab, logprobs=req.logprobs)
        if req.response_format is not None and req.response_format.type != "text":
            if ctx.guided is None:
                raise APIError(400, "response_format needs constrained decoding (llguidance)", param="response_format")
            ctx.guided.attach(engine, params, req.response_format)
        jobs.append((ids, params))
    return model_id, engine, jobs


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request):
    model_id, engine, jobs = prepare_completion(ctx, req)
    base_id = random_id("cmpl")
    handles = []
    try:
        for k, (ids, params) in enumerate(jobs):
            handles.append(engine.submit(ids, params, f"{base_id}-{k}", stream=req.stream))
    except BaseException:
        for h in handles:
            h.abort()
        raise
    if req.stream:
        return SSEResponse(_stream(ctx, engine, req, handles, base_id, model_id, raw), SSE_HEADERS)
    watchers = [watch_disconnect(raw, h) for h in handles]
    try:
        finals = await asyncio.gather(*(h.result() for h in handles))
    finally:
        for w in watchers:
            w.cancel()
        for h in handles:
            h.abort()
    token_text = ctx.token_text(engine)
    choices, prompt_tokens, completion_tokens, cached = [], 0, 0, 0
    for k, final in enumerate(finals):
        prompt_text = engine.tokenizer.decode(final.prompt_token_ids) if req.echo else ""
        prompt_tokens += len(final.prompt_token_ids)
        cached += final.num_cached_tokens
        for o in final.outputs:
            completion_tokens += len(o.token_ids)
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs(token_text, o.logprobs or [], req.logprobs, len(prompt_text))
            choices.append({"index": k * req.n + o.index, "text": prompt_text + o.text, "logprobs": lp,
                            "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
    return JSONResponse({"id": base_id, "object": "text_completion", "created": int(time.time()), "model": model_id,
                         "choices": choices, "usage": usage(prompt_tokens, completion_tokens, cached),
                         "system_fingerprint": None})


async def _stream(ctx, engine, req, handles, base_id, model_id, raw):
    created = int(time.time())
    opts = req.stream_options
    include_usage, continuous = bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats)
    token_text = ctx.token_text(engine)
    merged: asyncio.Queue | None = asyncio.Queue() if len(handles) > 1 else None  # several prompts' relay
    prompt_tokens = sum(len(h.prompt_token_ids) for h in handles)
    generated: dict[int, int] = {}
    sent_lp: dict[int, int] = {}
    offsets: dict[int, int] = {}

    async def pump(k, h):
        try:
            async for out in h:
                await merged.put((k, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
            await merged.put((k, exc))
            return
        await merged.put((k, None))

    async def merged_outputs():
        """(prompt index, output) of several prompts as they come: one relay task per prompt."""
        tasks.extend(asyncio.create_task(pump(k, h)) for k, h in enumerate(handles))
        done = 0
        while done < len(handles):
            k, out = await merged.get()
            if out is None:
                done += 1
            elif isinstance(out, BaseException):
                raise out
            else:
                yield k, out

    def chunk(choices):
        c = {"id": base_id, "object": "text_completion", "created": created, "model": model_id, "choices": choices}
        if include_usage:
            c["usage"] = usage(prompt_tokens, sum(generated.values())) if continuous else None
        return sse(c)

    def render(k, out) -> list[bytes]:
        chunks = []
        for o in out.outputs:
            idx = k * req.n + o.index
            generated[idx] = len(o.token_ids)
            lp = None
            if req.logprobs is not None and o.logprobs is not None and len(o.logprobs) > sent_lp.get(idx, 0) \
                    and (o.delta_text or o.finished):
                new = o.logprobs[sent_lp.get(idx, 0):]
                lp = completion_logprobs(token_text, new, req.logprobs, offsets.get(idx, 0))
                sent_lp[idx] = len(o.logprobs)
            offsets[idx] = offsets.get(idx, 0) + len(o.delta_text)
            if o.delta_text or lp:
                chunks.append(chunk([{"index": idx, "text": o.delta_text, "logprobs": lp, "finish_reason": None}]))
            if o.finished:
                chunks.append(chunk([{"index": idx, "text": "", "logprobs": None, "finish_reason": o.finish_reason,
                                      "stop_reason": o.stop_reason}]))
        return chunks

    tasks: list[asyncio.Task] = []
    watchers = [watch_disconnect(raw, h) for h in handles]
    stream = merged_outputs() if len(handles) > 1 else None
    try:
        if req.echo:
            for k, h in enumerate(handles):
                text = engine.tokenizer.decode(h.prompt_token_ids)
                for i in range(req.n):
                    offsets[k * req.n + i] = len(text)
                    yield chunk([{"index": k * req.n + i, "text": text, "logprobs": None, "finish_reason": None}])
        if stream is None:  # one prompt, the common case, reads its handle directly: no relay task and queue per token
            async for out in handles[0]:
                for c in render(0, out):
                    yield c
        else:
            async for k, out in stream:
                for c in render(k, out):
                    yield c
        if include_usage:
            cached = sum(h.final.num_cached_tokens for h in handles if h.final is not None)
            yield sse({"id": base_id, "object": "text_completion", "created": created, "model": model_id,
                       "choices": [], "usage": usage(prompt_tokens, sum(generated.values()), cached)})
    except Exception as exc:  # noqa: BLE001 - headers are out: report any failure in-band
        yield stream_error(exc)
    finally:
        if stream is not None:
            await stream.aclose()
        for t in tasks + watchers:
            t.cancel()
        for h in handles:
            h.abort()
    yield SSE_DONE
