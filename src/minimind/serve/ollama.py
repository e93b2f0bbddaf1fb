"""The Ollama REST API under /api/ (and `GET /`, which Ollama clients probe) for the apps that speak it: Open WebUI,
Continue, editor plugins, the ollama Python/JS clients.

A translation, not a second server: /api/chat becomes a ChatCompletionRequest run by prepare_chat (every check,
the chat template, tools, `format` as response_format); /api/generate a completions-style engine request
(requests_for) whose prompt is the chat template around `prompt` (or `prompt` itself with raw=true), after the
token ids of `context`. Replies go through the ReplyParser (thinking, tool calls) into Ollama's objects, whole or
streamed as NDJSON: one JSON object per line, the last with done=true, done_reason and the metrics (durations in
nanoseconds; load_duration is the time before the engine got the request, as the models stay loaded).
"""
from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError

from ..text.reply import ReplyParser, collect
from . import context as cx
from . import ollama_protocol as op
from .completions import chat_logprobs, prepare_chat
from .context import ServingContext
from .embeddings import embed
from .errors import APIError, validation_message
from .ollama_catalog import Catalog, resolve, thinks
from .protocol import ChatCompletionRequest, CompletionRequest, random_id
from .sse import SSEResponse

VERSION = "0.12.0"  # the Ollama API version whose shapes this follows (clients gate features on it)
UNAVAILABLE = "format needs constrained decoding: install the `serve` extra (llguidance)"
ERRORS = {code: {"model": op.ErrorResponse} for code in (400, 404, 429, 500, 503)}
_NDJSON = {"description": "with `stream: true` (the default) NDJSON: one JSON object per line, the last with "
                          "`done: true`", "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}
STREAMING = {**ERRORS, 200: _NDJSON}


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ndjson(obj) -> bytes:
    return orjson.dumps(obj) + b"\n"


def build(cls, **fields):
    """cls(**fields), a 400 naming the field when a translated value does not validate."""
    try:
        return cls(**fields)
    except ValidationError as exc:
        raise APIError(400, validation_message(list(exc.errors()))[0]) from None


def sampling(options: op.Options | None, fmt) -> dict:
    """Ollama's options and format -> the fields of our request models (only those given: the others take the
    model's sampling defaults). A negative seed is Ollama's "random"."""
    o = options or op.Options()
    fields = {"temperature": o.temperature, "top_p": o.top_p, "top_k": o.top_k, "min_p": o.min_p,
              "seed": o.seed if o.seed is None or o.seed >= 0 else None, "stop": o.stop,
              "repetition_penalty": o.repeat_penalty, "presence_penalty": o.presence_penalty,
              "frequency_penalty": o.frequency_penalty}
    fields = {k: v for k, v in fields.items() if v is not None}
    if fmt == "json":
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    return fields


def clamp_budget(jobs: list, options: op.Options | None, max_model_len: int) -> None:
    """num_predict caps the reply (<= 0: no cap; beyond the context: cut there, done_reason "length", as Ollama).
    num_ctx larger than the served context is clamped to it (Ollama clamps to the model's trained context); a
    smaller one caps prompt + reply, and a prompt that alone fills it is a 400 (Ollama would drop the prompt's
    start; this server never drops input)."""
    o = options or op.Options()
    for ids, params in jobs:
        if o.num_predict is not None and o.num_predict > 0:
            params.max_tokens = min(params.max_tokens, o.num_predict)
        if o.num_ctx is not None and o.num_ctx < max_model_len:
            if len(ids) >= o.num_ctx:
                raise APIError(400, f"the prompt has {len(ids)} tokens, which leaves no room for a reply in "
                                    f"options.num_ctx={o.num_ctx}", param="options.num_ctx")
            params.max_tokens = min(params.max_tokens, o.num_ctx - len(ids))


def open_thinking(req, engine) -> bool | None:
    """`think` -> the templates' open_thinking (a level is a yes); Ollama's 400 for a model that cannot think."""
    if req.think is None:
        return None
    if req.think is not False and not thinks(getattr(engine.tokenizer, "chat_template", None) or ""):
        raise APIError(400, f'"{req.model}" does not support thinking', param="think")
    return req.think is not False


def chat_messages(messages: list[op.Message]) -> list[dict]:
    """Ollama messages -> OpenAI ones (tool call arguments as JSON strings, tool_name as the tool's name)."""
    out = []
    for i, m in enumerate(messages):
        if m.images:
            raise APIError(400, f"this model reads text only; messages[{i}] has images: image content is not "
                                "supported", param=f"messages[{i}].images")
        d = {"role": m.role, "content": m.content or ""}
        if m.thinking:
            d["reasoning_content"] = m.thinking
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": (
                c.function.arguments if isinstance(c.function.arguments, str)
                else json.dumps(c.function.arguments, ensure_ascii=False))}} for c in m.tool_calls]
        if m.tool_name:
            d["name"] = m.tool_name
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def tool_call(call: dict) -> dict:
    """A parsed call -> Ollama's, arguments an object (a model's non-object arguments become {})."""
    try:
        args = json.loads(call["function"]["arguments"])
    except json.JSONDecodeError:
        args = None
    return {"id": call["id"], "function": {"index": call["index"], "name": call["function"]["name"],
                                           "arguments": args if isinstance(args, dict) else {}}}


def unloads(keep_alive) -> bool:
    return keep_alive == 0 or bool(isinstance(keep_alive, str) and re.fullmatch(r"0+(\.0*)?[a-zµ]*", keep_alive))


def loaded(req, kind: str) -> JSONResponse:
    """An empty chat / prompt loads the model in Ollama (keep_alive 0 unloads it); the served models are loaded at
    startup and stay loaded, so this only answers."""
    body = {"model": req.model, "created_at": now(), "done": True,
            "done_reason": "unload" if unloads(req.keep_alive) else "load"}
    body.update({"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""})
    return JSONResponse(body)


class Reply:
    """Ollama's objects for one request's outputs: chat (`message`) or generate (`response`, `context`)."""

    def __init__(self, kind: str, model: str, start: float, parse: dict, engine, top_n: int | None,
                 context: list[int] | None = None):
        self.kind, self.model, self.start, self.engine, self.top_n = kind, model, start, engine, top_n
        self.parser, self.context = ReplyParser(**parse), context
        self.submitted = start
        self.sent_lp = 0

    def fields(self, reasoning: str, content: str, calls: list) -> dict:
        if self.kind == "generate":
            return {"response": content, **({"thinking": reasoning} if reasoning else {})}
        message = {"role": "assistant", "content": content}
        if reasoning:
            message["thinking"] = reasoning
        if calls:
            message["tool_calls"] = [tool_call(c) for c in calls]
        return {"message": message}

    def logprobs(self, o, whole: bool = False) -> dict:
        if self.top_n is None or o.logprobs is None:
            return {}
        new = o.logprobs if whole else o.logprobs[self.sent_lp:]
        self.sent_lp = len(o.logprobs)
        return {"logprobs": chat_logprobs(self.engine.token_text, new, self.top_n)["content"]} if new else {}

    def line(self, events: list, o) -> dict:
        reasoning = "".join(t for k, t in events if k == "reasoning")
        content = "".join(t for k, t in events if k == "content")
        return {"model": self.model, "created_at": now(), **self.fields(reasoning, content, [
            t for k, t in events if k == "tool_call"]), **self.logprobs(o), "done": False}

    def final(self, out, fields: dict) -> dict:
        o, m, end = out.outputs[0], out.metrics, time.perf_counter()
        first = m.get("first_token", m.get("finished", end))
        metrics = {"total_duration": end - self.start, "load_duration": self.submitted - self.start,
                   "prompt_eval_count": len(out.prompt_token_ids),
                   "prompt_eval_duration": first - m.get("arrival", self.submitted), "eval_count": len(o.token_ids),
                   "eval_duration": m.get("finished", end) - first}
        metrics = {k: v if k.endswith("count") else int(v * 1e9) for k, v in metrics.items()}
        body = {"model": self.model, "created_at": now(), **fields, "done": True,
                "done_reason": "length" if o.finish_reason == "length" else "stop",
                **{k: v for k, v in metrics.items() if v > 0}}  # Ollama leaves zero values out
        if self.context is not None:
            body["context"] = self.context + list(o.token_ids)
        return body

    def whole(self, out) -> dict:
        o = out.outputs[0]
        reasoning, content, calls = collect(self.parser.feed(o.text) + self.parser.finish())
        return self.final(out, {**self.fields(reasoning, content, calls), **self.logprobs(o, whole=True)})


class NDJSONStream:
    """The sse.py renderer of Ollama's stream: a line per output with new text, thinking or tool calls (tool calls
    arrive whole), then the done line; a failure once the stream started is a last `{"error": ...}` line."""

    media_type = "application/x-ndjson"

    def __init__(self, reply: Reply, handles: list):
        self.reply, self.handles = reply, handles

    def head(self) -> list[bytes]:
        return []

    def render(self, _k: int, out) -> list[bytes]:
        o, parser = out.outputs[0], self.reply.parser
        events = parser.feed(o.delta_text) if o.delta_text else []
        if o.finished:
            events += parser.finish()
        line = self.reply.line(events, o)
        lines = [ndjson(line)] if events or "logprobs" in line else []
        if o.finished:
            lines.append(ndjson(self.reply.final(out, self.reply.fields("", "", []))))
        return lines

    def tail(self) -> list[bytes]:
        return []

    def error(self, exc: Exception) -> bytes:
        return ndjson({"error": exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"})

    def end(self) -> bytes:
        return b""


async def respond(ctx, raw: Request, reply: Reply, engine, jobs, stream: bool):
    handles = cx.submit(engine, jobs, random_id("ollama"), stream)
    reply.submitted = time.perf_counter()
    if stream:
        return SSEResponse(NDJSONStream(reply, handles))
    [final] = await cx.final_outputs(raw, handles)
    return JSONResponse(reply.whole(final))


async def chat(ctx: ServingContext, req: op.ChatRequest, raw: Request):
    start = time.perf_counter()
    model_id, engine = resolve(ctx, req.model)
    if not req.messages:
        return loaded(req, "chat")
    creq = build(ChatCompletionRequest, model=model_id, messages=chat_messages(req.messages), tools=req.tools,
                 stream=req.stream, open_thinking=open_thinking(req, engine), logprobs=bool(req.logprobs),
                 top_logprobs=req.top_logprobs if req.logprobs else None, **sampling(req.options, req.format))
    _, engine, jobs, parse = await prepare_chat(ctx, creq)
    clamp_budget(jobs, req.options, engine.max_model_len)
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    return await respond(ctx, raw, Reply("chat", req.model, start, parse, engine, top_n), engine, jobs, req.stream)


async def generate(ctx: ServingContext, req: op.GenerateRequest, raw: Request):
    start = time.perf_counter()
    model_id, engine = resolve(ctx, req.model)
    template = "a template override (prompts use the checkpoint's own chat template, or none with raw=true)"
    for name, what in (("suffix", "suffix (fill-in-the-middle)"), ("images", "images (this model reads text only)"),
                       ("template", template)):
        if getattr(req, name):
            raise APIError(400, f"{what} is not supported by this server", param=name)
    if req.raw and (req.system or req.context):
        raise APIError(400, "raw mode does not support template, system, or context", param="raw")
    if not req.prompt:
        return loaded(req, "generate")
    fields = {"model": model_id, "stream": req.stream, **sampling(req.options, req.format)}
    limit, top_n = ctx.prompt_limit(engine), ((req.top_logprobs or 0) if req.logprobs else None)
    if req.raw:
        creq = build(CompletionRequest, prompt=req.prompt, **fields)
        ctx.check_request(engine, creq, 1, "prompt")
        [ids] = await ctx.offload(cx.completion_prompts, engine.tokenizer, [req.prompt], limit)
        parse = {"parse_reasoning": False}
    else:
        messages = [{"role": "system", "content": req.system}] if req.system else []
        creq = build(ChatCompletionRequest, messages=[*messages, {"role": "user", "content": req.prompt}],
                     open_thinking=open_thinking(req, engine), **fields)
        ctx.check_request(engine, creq, 1, "prompt")
        text, ids = await ctx.offload(cx.chat_prompt, engine.tokenizer, creq, limit)
        ids = list(req.context or []) + ids  # the previous exchange, then this turn (Ollama's order)
        parse = {"started_in_think": text.rstrip(" ").endswith(("<think>", "<think>\n"))}
    jobs = ctx.requests_for(engine, creq, [ids], "prompt", None, top_n, UNAVAILABLE)
    clamp_budget(jobs, req.options, engine.max_model_len)
    reply = Reply("generate", req.model, start, parse, engine, top_n, None if req.raw else ids)
    return await respond(ctx, raw, reply, engine, jobs, req.stream)


async def embeddings(ctx: ServingContext, req: op.EmbedRequest, raw: Request) -> dict:
    """/api/embed through serve/embeddings.py: unit-length mean-pooled vectors (Ollama's are unit length too);
    `dimensions` other than the model's hidden size is a 400, as on /v1/embeddings."""
    start = time.perf_counter()
    _, engine = resolve(ctx, req.model)
    hidden = engine.llm.config.hidden_size
    if req.dimensions is not None and req.dimensions != hidden:
        raise APIError(400, f"dimensions: this model's embeddings have {hidden} dimensions and cannot be shortened",
                       param="dimensions")
    inputs = ([req.input] if req.input else []) if isinstance(req.input, str) else req.input
    if not inputs:  # Ollama answers an empty input with no embeddings
        return {"model": req.model, "embeddings": []}
    vectors, tokens = await embed(ctx, engine, inputs, truncate=req.truncate, raw=raw)
    return {"model": req.model, "embeddings": vectors, "total_duration": int((time.perf_counter() - start) * 1e9),
            "prompt_eval_count": tokens}


def add_routes(app: FastAPI, ctx: ServingContext) -> None:
    catalog = Catalog(ctx)

    @app.post("/api/chat", response_model=op.ChatResponse, responses=STREAMING, tags=["ollama"])
    async def api_chat(req: op.ChatRequest, raw: Request):
        """Ollama chat; streams NDJSON unless `stream: false`."""
        return await chat(ctx, req, raw)

    @app.post("/api/generate", response_model=op.GenerateResponse, responses=STREAMING, tags=["ollama"])
    async def api_generate(req: op.GenerateRequest, raw: Request):
        """Ollama generate: the chat template around `prompt` (raw: `prompt` alone); streams unless `stream: false`."""
        return await generate(ctx, req, raw)

    async def api_tags():
        return catalog.tags()

    async def api_version():
        return {"version": VERSION}

    async def root():
        """`Ollama is running`, the answer Ollama clients probe for."""
        return PlainTextResponse("Ollama is running")

    for path, fn, model in (("/api/tags", api_tags, op.TagsResponse), ("/api/version", api_version,
                                                                        op.VersionResponse), ("/", root, None)):
        app.add_api_route(path, fn, methods=["GET"], response_model=model, tags=["ollama"],
                          response_class=PlainTextResponse if model is None else JSONResponse)
        app.add_api_route(path, fn, methods=["HEAD"], include_in_schema=False)  # Ollama answers HEAD too

    @app.get("/api/ps", response_model=op.PsResponse, tags=["ollama"])
    async def api_ps():
        return catalog.ps()

    @app.post("/api/show", response_model=op.ShowResponse, responses=ERRORS, tags=["ollama"])
    async def api_show(req: op.ShowRequest):
        return catalog.show(req)

    @app.post("/api/embed", response_model=op.EmbedResponse, responses=ERRORS, tags=["ollama"])
    async def api_embed(req: op.EmbedRequest, raw: Request):
        return await embeddings(ctx, req, raw)

    @app.post("/api/embeddings", response_model=op.EmbeddingsResponse, responses=ERRORS, tags=["ollama"])
    async def api_embeddings(req: op.EmbeddingsRequest, raw: Request):
        """The older embeddings route: one `prompt`, one `embedding` (empty for an empty prompt)."""
        one = await embeddings(ctx, op.EmbedRequest(model=req.model, input=req.prompt, truncate=False), raw)
        return {"embedding": one["embeddings"][0] if one["embeddings"] else []}

    async def not_managed(raw: Request):
        raise APIError(400, f"{raw.url.path} is not available: this server does not manage models; it serves the "
                            "models it was started with (see /api/tags)")

    for path, method in (("/api/pull", "POST"), ("/api/push", "POST"), ("/api/create", "POST"),
                         ("/api/copy", "POST"), ("/api/delete", "DELETE")):
        app.add_api_route(path, not_managed, methods=[method], responses=ERRORS, tags=["ollama"],
                          summary=f"{path}: not available (this server does not manage models)")
