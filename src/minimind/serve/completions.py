"""POST /v1/completions: raw text (or token id) prompts; several prompts run as several engine requests in the
same batch, choice index = prompt index * n + completion index (OpenAI's order)."""
from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse

from .context import ServingContext, final_outputs
from .errors import APIError
from .formatting import completion_logprobs, usage
from .params import check_prompt, check_stream_options, completion_prompts, resolve_max_tokens, sampling_params
from .protocol import CompletionRequest, random_id
from .sse import SSEResponse, StreamRenderer


def prepare_completion(ctx: ServingContext, req: CompletionRequest):
    """Everything that can fail with a 4xx, done before the response starts."""
    model_id, engine = ctx.engine_for(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    check_stream_options(req)
    vocab = engine.llm.config.vocab_size
    jobs = []
    for ids in completion_prompts(engine.tokenizer, req):
        check_prompt(ids, vocab, "prompt")
        max_tokens = resolve_max_tokens(req.max_tokens, len(ids), engine.max_model_len, "prompt")
        if req.max_tokens is None:  # OpenAI's default of 16, clamped to what the context has left
            max_tokens = min(16, max_tokens)
        params = sampling_params(req, max_tokens=max_tokens, vocab_size=vocab, logprobs=req.logprobs)
        ctx.constrain(engine, params, req.response_format, "response_format needs constrained decoding (llguidance)")
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
        return SSEResponse(CompletionStream(req, handles, base_id, model_id, ctx.token_text(engine), engine.tokenizer))
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


def _text_choice(index: int, text: str, logprobs=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}


class CompletionStream(StreamRenderer):
    """Echoed prompts first, then a text chunk per output with new text or logprobs, a finish chunk per choice,
    and the usage chunk when asked for. Several prompts' outputs come interleaved as the engine steps them."""

    object = "text_completion"

    def __init__(self, req: CompletionRequest, handles: list, base_id: str, model_id: str, token_text, tokenizer):
        super().__init__(req, handles, base_id, model_id, token_text)
        self.req, self.tokenizer = req, tokenizer
        self.offsets: dict[int, int] = {}  # choice index -> text_offset of its next token

    def head(self) -> list[bytes]:
        if not self.req.echo:
            return []
        chunks, n = [], self.req.n
        for k, h in enumerate(self.handles):
            text = self.tokenizer.decode(h.prompt_token_ids)
            for i in range(n):
                self.offsets[k * n + i] = len(text)
                chunks.append(self.chunk(_text_choice(k * n + i, text)))
        return chunks

    def render(self, k: int, out) -> list[bytes]:
        chunks, req = [], self.req
        for o in out.outputs:
            idx = k * req.n + o.index
            self.generated[idx] = len(o.token_ids)
            lp = None
            if req.logprobs is not None and (o.delta_text or o.finished) and (new := self.new_logprobs(idx, o)):
                lp = completion_logprobs(self.token_text, new, req.logprobs, self.offsets.get(idx, 0))
            self.offsets[idx] = self.offsets.get(idx, 0) + len(o.delta_text)
            if o.delta_text and lp is None and not self.continuous:
                chunks.append(self.text_chunk(idx, o.delta_text, _text_choice))
            elif o.delta_text or lp:
                chunks.append(self.chunk(_text_choice(idx, o.delta_text, lp)))
            if o.finished:
                chunks.append(self.chunk({"index": idx, "text": "", "logprobs": None, "finish_reason": o.finish_reason,
                                          "stop_reason": o.stop_reason}))
        return chunks
