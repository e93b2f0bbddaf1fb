"""POST /v1/completions: raw text (or token id) prompts; several prompts run as several engine requests in the
same batch, choice index = prompt index * n + completion index (OpenAI's order)."""
from __future__ import annotations

from fastapi import Request

from .context import ServingContext, final_outputs, submit
from .errors import APIError
from .formatting import completion_logprobs, whole_response
from .params import check_stream_options, completion_prompts
from .protocol import CompletionRequest, random_id
from .sse import SSEResponse, StreamRenderer


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request):
    model_id, engine = ctx.engine_for(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    check_stream_options(req)
    jobs = ctx.requests_for(engine, req, completion_prompts(engine.tokenizer, req), "prompt", req.max_tokens,
                            req.logprobs, "response_format needs constrained decoding (llguidance)")
    if req.max_tokens is None:  # OpenAI's default of 16, clamped to what the context has left
        for _, params in jobs:
            params.max_tokens = min(16, params.max_tokens)
    response_id = random_id("cmpl")
    handles = submit(engine, jobs, response_id, req.stream)
    if req.stream:
        return SSEResponse(CompletionStream(req, handles, response_id, model_id, engine.token_text, engine.tokenizer))
    finals = await final_outputs(raw, handles)
    choices = []
    for k, final in enumerate(finals):
        prompt_text = engine.tokenizer.decode(final.prompt_token_ids) if req.echo else ""
        for o in final.outputs:
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs(engine.token_text, o.logprobs or [], req.logprobs, len(prompt_text))
            choices.append({"index": k * req.n + o.index, "text": prompt_text + o.text, "logprobs": lp,
                            "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
    return whole_response(response_id, "text_completion", model_id, finals, choices)


def _text_choice(index: int, text: str, logprobs=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}


class CompletionStream(StreamRenderer):
    """Echoed prompts first, then a text chunk per output with new text or logprobs, a finish chunk per choice,
    and the usage chunk when asked for. Several prompts' outputs come interleaved as the engine steps them."""

    object = "text_completion"

    def __init__(self, req: CompletionRequest, handles: list, response_id: str, model_id: str, token_text,
                 tokenizer):
        super().__init__(req, handles, response_id, model_id, token_text)
        self.req, self.tokenizer = req, tokenizer
        self.offsets: dict[int, int] = {}  # choice index -> text_offset of its next token

    def head(self) -> list[bytes]:
        if not self.req.echo:
            return []
        chunks, n = [], self.req.n
        for k, h in enumerate(self.handles):
            text = self.tokenizer.decode(h.prompt_token_ids)
            for i in range(k * n, k * n + n):
                self.offsets[i] = len(text)
                chunks.append(self.chunk(_text_choice(i, text)))
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
