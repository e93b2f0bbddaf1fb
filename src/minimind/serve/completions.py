"""POST /v1/completions: raw text (or token id) prompts; several prompts run as several engine requests in the
same batch, choice index = prompt index * n + completion index (OpenAI's order)."""
from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse

from .context import ServingContext, final_outputs
from .errors import APIError
from .formatting import completion_logprobs, usage
from .params import check_prompt, completion_prompts, resolve_max_tokens, sampling_params
from .protocol import CompletionRequest, random_id
from .sse import ChunkTemplate, SSEResponse, sse


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
    handles = []  # one collector for all: the response reads the prompts' outputs as they come
    try:
        for k, (ids, params) in enumerate(jobs):
            collector = handles[0].collector if handles else None
            handles.append(engine.submit(ids, params, f"{base_id}-{k}", stream=req.stream, collector=collector, k=k))
    except BaseException:
        for h in handles:
            h.abort()
        raise
    if req.stream:
        return SSEResponse(CompletionStream(ctx, engine, req, handles, base_id, model_id), handles)
    finals = await final_outputs(raw, handles)
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


class CompletionStream:
    """The SSE chunks of one streamed completion request (sse.Renderer): echoed prompts first, then a text chunk
    per output with new text or logprobs, a finish chunk per choice, and the usage chunk when asked for. Several
    prompts' outputs come interleaved as the engine steps them (choice index = prompt index * n + index)."""

    def __init__(self, ctx: ServingContext, engine, req: CompletionRequest, handles: list, base_id: str, model_id: str):
        self.engine, self.req, self.handles, self.base_id, self.model_id = engine, req, handles, base_id, model_id
        self.created = int(time.time())
        opts = req.stream_options
        self.include_usage = bool(opts and opts.include_usage)
        self.continuous = bool(opts and opts.continuous_usage_stats)
        self.token_text = ctx.token_text(engine)
        self.prompt_tokens = sum(len(h.prompt_token_ids) for h in handles)
        self.generated: dict[int, int] = {}
        self.sent_lp: dict[int, int] = {}
        self.offsets: dict[int, int] = {}
        self.text_chunks: dict[int, ChunkTemplate] = {}  # choice index -> its plain text chunk

    def text_chunk(self, idx: int, text: str) -> bytes:
        if idx not in self.text_chunks:
            self.text_chunks[idx] = ChunkTemplate(
                lambda t: self.chunk_obj([{"index": idx, "text": t, "logprobs": None, "finish_reason": None}]))
        return self.text_chunks[idx](text)

    def chunk(self, choices) -> bytes:
        return sse(self.chunk_obj(choices))

    def chunk_obj(self, choices) -> dict:
        c = {"id": self.base_id, "object": "text_completion", "created": self.created, "model": self.model_id,
             "choices": choices}
        if self.include_usage:
            c["usage"] = usage(self.prompt_tokens, sum(self.generated.values())) if self.continuous else None
        return c

    def head(self) -> list[bytes]:
        if not self.req.echo:
            return []
        chunks, n = [], self.req.n
        for k, h in enumerate(self.handles):
            text = self.engine.tokenizer.decode(h.prompt_token_ids)
            for i in range(n):
                self.offsets[k * n + i] = len(text)
                chunks.append(self.chunk([{"index": k * n + i, "text": text, "logprobs": None, "finish_reason": None}]))
        return chunks

    def render(self, k: int, out) -> list[bytes]:
        chunks, req = [], self.req
        for o in out.outputs:
            idx = k * req.n + o.index
            self.generated[idx] = len(o.token_ids)
            lp = None
            sent = self.sent_lp.get(idx, 0)
            if req.logprobs is not None and o.logprobs is not None and len(o.logprobs) > sent \
                    and (o.delta_text or o.finished):
                lp = completion_logprobs(self.token_text, o.logprobs[sent:], req.logprobs, self.offsets.get(idx, 0))
                self.sent_lp[idx] = len(o.logprobs)
            self.offsets[idx] = self.offsets.get(idx, 0) + len(o.delta_text)
            if o.delta_text and lp is None and not self.continuous:
                chunks.append(self.text_chunk(idx, o.delta_text))
            elif o.delta_text or lp:
                chunks.append(self.chunk([{"index": idx, "text": o.delta_text, "logprobs": lp, "finish_reason": None}]))
            if o.finished:
                chunks.append(self.chunk([{"index": idx, "text": "", "logprobs": None, "finish_reason": o.finish_reason,
                                           "stop_reason": o.stop_reason}]))
        return chunks

    def tail(self) -> list[bytes]:
        if not self.include_usage:
            return []
        cached = sum(h.final.num_cached_tokens for h in self.handles if h.final is not None)
        return [sse({"id": self.base_id, "object": "text_completion", "created": self.created, "model": self.model_id,
                     "choices": [], "usage": usage(self.prompt_tokens, sum(self.generated.values()), cached)})]
