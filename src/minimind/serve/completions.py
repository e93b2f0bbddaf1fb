"""POST /v1/chat/completions and POST /v1/completions: checked engine requests (context.py), answered whole or as
an SSE stream (sse.py).

Chat: the prompt comes from the checkpoint's own chat template; reasoning_content and tool_calls are split out of
the text (text/reply.py). Completions: raw text (or token id) prompts; several prompts run as several engine
requests in the same batch, choice index = prompt index * n + completion index (OpenAI's order).
"""
from __future__ import annotations

import math
import time

from fastapi import Request
from fastapi.responses import JSONResponse

from ..engine import RequestOutput
from ..text.reply import ReplyParser, collect
from ..text.template import tool_format
from . import context as cx
from .context import ServingContext
from .errors import APIError
from .guided import forced_tools
from .protocol import ChatCompletionRequest, CompletionRequest, random_id
from .scoring import choice_logprobs, completion_logprobs, prompt_entries
from .sse import SSEResponse, StreamRenderer, usage


def _finite(x: float) -> float:
    # JSON has no -inf; a masked-out top token would otherwise break the response
    return x if math.isfinite(x) else -9999.0


def chat_logprobs(token_text, logprobs, top_n: int) -> dict:
    entries = []
    for lp in logprobs:
        tok = token_text(lp.token_id)
        entry = {"token": tok, "logprob": _finite(lp.logprob), "bytes": list(tok.encode("utf-8")), "top_logprobs": []}
        for top in lp.top[:top_n]:
            t = token_text(top.token_id)
            entry["top_logprobs"].append({"token": t, "logprob": _finite(top.logprob),
                                          "bytes": list(t.encode("utf-8"))})
        entries.append(entry)
    return {"content": entries}


def whole_response(response_id: str, obj: str, model_id: str, finals: list[RequestOutput], choices: list):
    prompt, cached = sum(len(f.prompt_token_ids) for f in finals), sum(f.num_cached_tokens for f in finals)
    generated = sum(len(o.token_ids) for f in finals for o in f.outputs)
    return JSONResponse({"id": response_id, "object": obj, "created": int(time.time()), "model": model_id,
                         "choices": choices, "usage": usage(prompt, generated, cached), "system_fingerprint": None})


async def prepare_chat(ctx: ServingContext, req: ChatCompletionRequest):
    """Everything that can fail with a 4xx, done before the response starts; the prompt is rendered and
    tokenized on the tokenizer pool."""
    model_id, engine = ctx.engine_for(req.model)
    cx.check_stream_options(req)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    ctx.check_request(engine, req, 1, "messages")
    forced = forced_tools(req)
    if forced is not None and ctx.guided is None:
        raise APIError(400, "tool_choice required or named needs constrained decoding: install the `serve` extra "
                            "(llguidance)", param="tool_choice")
    text, ids = await ctx.offload(cx.chat_prompt, engine.tokenizer, req, ctx.prompt_limit(engine))
    parse = {"started_in_think": text.rstrip(" ").endswith(("<think>", "<think>\n")),
             "parse_tools": bool(req.tools) and req.tool_choice != "none"}
    grammar = None
    if parse["parse_tools"] and ctx.guided is not None:  # a bad schema is a 400 whatever the tool_choice
        schemas = await ctx.offload(ctx.guided.tool_schemas, engine, req.tools)
        if forced is not None:
            wanted = {t.function.name: schemas[t.function.name] for t in forced}
            grammar = await ctx.offload(ctx.guided.tool_grammar, engine, wanted, tool_format(engine.tokenizer),
                                        req.parallel_tool_calls is not False, parse["started_in_think"])
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    # a forced call has no message content for response_format to shape: the tool grammar takes precedence
    checked = req if grammar is None else req.model_copy(update={"response_format": None})
    jobs = ctx.requests_for(engine, checked, [ids], "messages", requested, logprobs,
                            "response_format needs constrained decoding: install the `serve` extra (llguidance)")
    if grammar is not None:
        for _, params in jobs:
            ctx.guided.add(engine, params, grammar)
    parse["tools_enforced"] = grammar is not None
    return model_id, engine, jobs, parse


def finish_reason(reason: str | None, has_tool_calls: bool) -> str | None:
    return "tool_calls" if reason == "stop" and has_tool_calls else reason


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request):
    model_id, engine, jobs, parse = await prepare_chat(ctx, req)
    response_id = random_id("chatcmpl")
    handles = cx.submit(engine, jobs, response_id, req.stream)
    if req.stream:
        return SSEResponse(ChatStream(req, handles, response_id, model_id, parse))
    finals = await cx.final_outputs(raw, handles)
    top_n = jobs[0][1].logprobs
    choices = []
    for o in finals[0].outputs:
        p = ReplyParser(**parse, stream_tool_calls=True)  # arguments as generated, as the stream has them
        reasoning, content, calls = collect(p.feed(o.text) + p.finish())
        message = {"role": "assistant", "content": content if (content or not calls) else None,
                   "reasoning_content": reasoning or None,
                   "tool_calls": [{k: v for k, v in c.items() if k != "index"} for c in calls]}
        lp = None if top_n is None else chat_logprobs(engine.token_text, o.logprobs or [], top_n)
        choices.append({"index": o.index, "message": message, "logprobs": lp,
                        "finish_reason": finish_reason(o.finish_reason, bool(calls)), "stop_reason": o.stop_reason})
    return whole_response(response_id, "chat.completion", model_id, finals, choices)


def _choice(index: int, delta: dict, logprobs=None, finish: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def _add_tool_delta(calls: list, value: dict) -> None:
    """One entry per call in a chunk: a further piece of the same call's arguments joins the last entry."""
    if calls and calls[-1]["index"] == value["index"]:
        last = calls[-1]
        joined = last["function"]["arguments"] + value["function"]["arguments"]
        calls[-1] = {**last, "function": {**last["function"], "arguments": joined}}
    else:
        calls.append(value)


class ChatStream(StreamRenderer):
    """A role chunk per choice, then deltas of content / reasoning_content / tool_calls as the parser splits them
    out (an enforced call: its id, type and name first, then pieces of its arguments; else each call whole), a
    finish chunk per choice, and the usage chunk when stream_options asks for it."""

    object = "chat.completion.chunk"

    def __init__(self, req: ChatCompletionRequest, handles: list, response_id: str, model_id: str, parse: dict):
        super().__init__(req, handles, response_id, model_id)
        self.parsers = [ReplyParser(**parse, stream_tool_calls=True) for _ in range(req.n)]
        self.top_n = (req.top_logprobs or 0) if req.logprobs else None

    def head(self) -> list[bytes]:
        return [self.chunk(_choice(i, {"role": "assistant", "content": ""})) for i in range(len(self.parsers))]

    def render(self, _k: int, out) -> list[bytes]:
        chunks = []
        for i, o in self.choices(0, out):
            events = self.parsers[i].feed(o.delta_text) if o.delta_text else []
            if o.finished:
                events += self.parsers[i].finish()
            lp = None
            if self.top_n is not None and (events or o.finished) and (new := self.new_logprobs(i, o)):
                lp = chat_logprobs(self.token_text, new, self.top_n)
            delta: dict = {}
            for kind, value in events:
                if kind == "tool_call":
                    _add_tool_delta(delta.setdefault("tool_calls", []), value)
                else:
                    key = "reasoning_content" if kind == "reasoning" else "content"
                    delta[key] = delta.get(key, "") + value
            if lp is None and not self.continuous and len(delta) == 1 and "content" in delta:
                chunks.append(self.text_chunk(i, delta["content"], lambda i, t: _choice(i, {"content": t})))
            elif delta or lp:
                chunks.append(self.chunk(_choice(i, delta, lp)))
            if o.finished:
                reason = finish_reason(o.finish_reason, self.parsers[i].num_tool_calls > 0)
                chunks.append(self.chunk(_choice(i, {}, None, reason)))
        return chunks


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request):
    model_id, engine = ctx.engine_for(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    cx.check_stream_options(req)
    prompts = cx.prompt_list(req)
    ctx.check_request(engine, req, len(prompts), "prompt")
    limit = ctx.prompt_limit(engine)
    if any(isinstance(x, str) for x in prompts):
        ids = await ctx.offload(cx.completion_prompts, engine.tokenizer, prompts, limit)
    else:  # token ids: nothing to tokenize
        ids = cx.completion_prompts(engine.tokenizer, prompts, limit)
    jobs = ctx.requests_for(engine, req, ids, "prompt", req.max_tokens, req.logprobs,
                            "response_format needs constrained decoding (llguidance)")
    for _, params in jobs:
        if req.max_tokens is None:  # OpenAI's default of 16, clamped to what the context has left
            params.max_tokens = min(16, params.max_tokens)
        if req.echo and req.logprobs is not None:  # the echoed prompt's own logprobs first (scoring, lm-eval)
            params.prompt_logprobs = req.logprobs
    response_id = random_id("cmpl")
    handles = cx.submit(engine, jobs, response_id, req.stream)
    if req.stream:
        return SSEResponse(CompletionStream(req, handles, response_id, model_id))
    finals = await cx.final_outputs(raw, handles)
    choices = []
    for k, final in enumerate(finals):
        prompt_text = engine.tokenizer.decode(final.prompt_token_ids) if req.echo else ""
        for o in final.outputs:
            lp = choice_logprobs(engine.token_text, req, final, o)
            choices.append({"index": k * req.n + o.index, "text": prompt_text + o.text, "logprobs": lp,
                            "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
    return whole_response(response_id, "text_completion", model_id, finals, choices)


def _text_choice(index: int, text: str, logprobs=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}


class CompletionStream(StreamRenderer):
    """Echoed prompts first (with logprobs: in each choice's first chunk, once its prompt's logprobs are computed),
    then a text chunk per output with new text or logprobs, a finish chunk per choice, and the usage chunk when asked
    for. Several prompts' outputs come interleaved as the engine steps them."""

    object = "text_completion"

    def __init__(self, req: CompletionRequest, handles: list, response_id: str, model_id: str):
        super().__init__(req, handles, response_id, model_id)
        self.req = req
        self.offsets: dict[int, int] = {}  # choice index -> text_offset of its next token
        self.echo_logprobs = req.echo and req.logprobs is not None

    def head(self) -> list[bytes]:
        if not self.req.echo or self.echo_logprobs:
            return []
        chunks, n = [], self.req.n
        for k, h in enumerate(self.handles):
            text = h.engine.tokenizer.decode(h.prompt_token_ids)
            for i in range(k * n, k * n + n):
                chunks.append(self.chunk(_text_choice(i, text)))
        return chunks

    def render(self, k: int, out) -> list[bytes]:
        chunks, req = [], self.req
        for idx, o in self.choices(k, out, req.n):
            text, entries = o.delta_text, []
            if req.logprobs is not None and (o.delta_text or o.finished):
                entries = self.new_logprobs(idx, o) or []
            if self.echo_logprobs and idx not in self.offsets:  # this choice's first chunk
                text = self.handles[k].engine.tokenizer.decode(out.prompt_token_ids) + text
                entries = prompt_entries(out) + entries
            lp = None
            if entries:
                lp, self.offsets[idx] = completion_logprobs(self.token_text, entries, req.logprobs,
                                                            self.offsets.get(idx, 0))
            if text and lp is None and not self.continuous:
                chunks.append(self.text_chunk(idx, text, _text_choice))
            elif text or lp:
                chunks.append(self.chunk(_text_choice(idx, text, lp)))
            if o.finished:
                chunks.append(self.chunk({"index": idx, "text": "", "logprobs": None, "finish_reason": o.finish_reason,
                                          "stop_reason": o.stop_reason}))
        return chunks
