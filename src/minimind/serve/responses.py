"""The OpenAI Responses API (POST /v1/responses, GET / DELETE /v1/responses/{id}, GET .../input_items,
POST /v1/responses/input_tokens) as a translation onto the chat-completions machinery: input items ->
ChatCompletionRequest -> prepare_chat + submit (completions.py, context.py), and the reply parser's events ->
output items, whole or as the typed event stream.

Stored responses (store=true, the API's default) live in a bounded in-memory LRU owned by the app: the oldest
beyond `capacity` are forgotten, and a server restart forgets them all.
"""
from __future__ import annotations

import time
import uuid
from collections import OrderedDict

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..text.reply import ReplyParser
from . import context as cx
from .completions import chat_logprobs, prepare_chat
from .context import ServingContext
from .errors import APIError, error_body
from .protocol import ChatCompletionRequest, ErrorResponse, JsonSchemaSpec, ResponseFormat, TextPart
from .responses_protocol import InputItemList, InputTokens, ResponseDeleted, ResponseObject, ResponsesRequest
from .sse import SSEResponse, named_sse

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500, 503)}
STREAMED = {**ERRORS, 200: {"description": "the response; with `stream: true` an SSE stream of typed events",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}}}}
TEXT_PARTS = ("input_text", "output_text", "text", "reasoning_text", "summary_text")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseStore:
    """Stored responses by id, least recently used first out beyond `capacity`."""

    def __init__(self, capacity: int = 512):
        self.capacity, self.records = capacity, OrderedDict()

    def get(self, rid: str, param: str | None = None) -> dict:
        record = self.records.get(rid)
        if record is None:
            raise APIError(404, f"Response with id '{rid}' not found.", param=param, code="not_found")
        self.records.move_to_end(rid)
        return record

    def delete(self, rid: str) -> None:
        self.get(rid)
        del self.records[rid]

    def put(self, rid: str, record: dict) -> None:
        self.records[rid] = record
        while len(self.records) > self.capacity:
            self.records.popitem(last=False)


# ------------------------------------------------------------------ request: input items -> chat messages
def _text(parts, where: str) -> str:
    if isinstance(parts, str):
        return parts
    out = []
    for j, p in enumerate(parts):
        kind = p["type"]
        if kind == "refusal":
            out.append(p.get("refusal") or "")
        else:  # a media part is a 400 naming it, as in chat completions
            out.append(cx.part_text(TextPart(type="text" if kind in TEXT_PARTS else kind, text=p.get("text")),
                                    f"{where}.content[{j}]"))
    return "".join(out)


def normalized_items(req: ResponsesRequest) -> list[dict]:
    """The request's input as item dicts with ids and part lists (the shape GET input_items lists)."""
    raw = [{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str) else \
        [item.model_dump(exclude_none=True) for item in req.input]
    items = []
    for item in raw:
        if item["type"] == "message":
            assistant = item["role"] == "assistant"
            content = item["content"]
            if isinstance(content, str):
                part = "output_text" if assistant else "input_text"
                content = [{"type": part, "text": content, **({"annotations": []} if assistant else {})}]
            item = {**item, "content": content, "status": item.get("status", "completed")}
        items.append({"id": new_id({"message": "msg", "function_call": "fc", "reasoning": "rs"}.get(
            item["type"], "fco")), **item})
    return items


def item_messages(items: list[dict], offset: int) -> list[dict]:
    """Items -> chat messages: a function_call joins the assistant turn before it, a function_call_output is a
    `tool` message, a reasoning item is the next assistant turn's reasoning_content. Items before `offset` come
    from previous_response_id (already checked)."""
    messages, reasoning = [], None
    for i, item in enumerate(items):
        where = f"input[{i - offset}]"
        kind = item["type"]
        if kind == "reasoning":
            reasoning = _text(item.get("content") or item.get("summary") or [], where)
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(item["output"], where)})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": item["role"], "content": _text(item["content"], where)})
        if reasoning is not None and kind != "reasoning" and messages and messages[-1]["role"] == "assistant":
            messages[-1]["reasoning_content"], reasoning = reasoning, None
    return messages


def chat_request(req: ResponsesRequest, context: list[dict], items: list[dict]) -> ChatCompletionRequest:
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    messages += item_messages(context + items, len(context))
    if not messages:
        raise APIError(400, "input is empty: give a string or at least one input item", param="input")
    fmt = req.text.format if req.text else None
    response_format = None
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_schema" and fmt.schema_ is None:
            raise APIError(400, "text.format.schema is required for type json_schema", param="text.format.schema")
        spec = None if fmt.type == "json_object" else JsonSchemaSpec(
            name=fmt.name or "schema", description=fmt.description, schema=fmt.schema_, strict=fmt.strict)
        response_format = ResponseFormat(type=fmt.type, json_schema=spec)
    choice = req.tool_choice
    if choice is not None and not isinstance(choice, str):
        choice = {"type": "function", "function": {"name": choice.name}}
    effort = req.reasoning.effort if req.reasoning else None
    logprobs = "message.output_text.logprobs" in (req.include or [])
    try:
        return ChatCompletionRequest(
            model=req.model, messages=messages, max_completion_tokens=req.max_output_tokens,
            temperature=req.temperature, top_p=req.top_p, logprobs=logprobs,
            top_logprobs=(req.top_logprobs or 0) if logprobs else None, response_format=response_format,
            tools=[{"type": "function", "function": {"name": t.name, "description": t.description,
                                                     "parameters": t.parameters}} for t in req.tools or []] or None,
            tool_choice=choice, parallel_tool_calls=req.parallel_tool_calls, stream=req.stream,
            chat_template_kwargs=None if effort is None else {"open_thinking": effort != "none"})
    except ValidationError as exc:
        raise APIError(400, f"input cannot be served: {exc.errors()[0]['msg']}", param="input") from None


# ------------------------------------------------------------------ output: reply events -> output items
class OutputItems:
    """The output items the reply parser's events make, and the stream events that build them (without
    sequence numbers). Streamed and whole responses both go through it, so they are the same items."""

    def __init__(self):
        self.items: list[dict] = []
        self.open: dict | None = None  # the reasoning or message item text is going into
        self.pending_lp: list = []  # logprob entries not yet sent with a text delta
        self.index: dict[str, int] = {}  # item id -> output_index

    def _ids(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.index[item["id"]]}

    def _add(self, item: dict) -> None:
        self.index[item["id"]] = len(self.items)
        self.items.append(item)

    def feed(self, events: list, logprobs: list | None = None) -> list[dict]:
        out: list[dict] = []
        self.pending_lp += logprobs or []
        for kind, value in events:
            if kind == "tool_call":
                self._close(out, "completed")
                fn = value["function"]
                item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "arguments": "",
                        "call_id": value["id"], "name": fn["name"]}
                self._add(item)
                out.append({"type": "response.output_item.added", "output_index": len(self.items) - 1,
                            "item": dict(item)})
                item.update(arguments=fn["arguments"], status="completed")
                out += [{"type": "response.function_call_arguments.delta", **self._ids(item), "delta": fn["arguments"]},
                        {"type": "response.function_call_arguments.done", **self._ids(item), "name": fn["name"],
                         "arguments": fn["arguments"]},
                        {"type": "response.output_item.done", "output_index": len(self.items) - 1, "item": item}]
                continue
            item = self._item("reasoning" if kind == "reasoning" else "message", out)
            part = item["content"][0]
            part["text"] += value
            delta = {"type": f"response.{part['type']}.delta", **self._ids(item), "content_index": 0, "delta": value}
            if part["type"] == "output_text":
                delta["logprobs"], self.pending_lp = self.pending_lp, []
                part["logprobs"] += delta["logprobs"]
            out.append(delta)
        return out

    def _item(self, kind: str, out: list) -> dict:
        if self.open is not None and self.open["type"] == kind:
            return self.open
        self._close(out, "completed")
        if kind == "message":
            item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "status": "in_progress", "content": []}
            part = {"type": "reasoning_text", "text": ""}
        self._add(item)
        out += [{"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": dict(item)},
                {"type": "response.content_part.added", **self._ids(item), "content_index": 0, "part": dict(part)}]
        item["content"], self.open = [part], item
        return item

    def _close(self, out: list, status: str) -> None:
        item, self.open = self.open, None
        if item is None:
            return
        part, ids = item["content"][0], self._ids(item)
        done = {"type": f"response.{part['type']}.done", **ids, "content_index": 0, "text": part["text"]}
        if part["type"] == "output_text":
            done["logprobs"] = part["logprobs"]
        item["status"] = status
        out += [done, {"type": "response.content_part.done", **ids, "content_index": 0, "part": part},
                {"type": "response.output_item.done", "output_index": ids["output_index"], "item": item}]

    def close(self, status: str) -> list[dict]:
        """The last item closes with the response's status; a reply with no item at all is one empty message."""
        out: list[dict] = []
        if not self.items:
            self._item("message", out)
        self._close(out, status)
        return out


class Turn:
    """One /v1/responses request from submission to its response object (and its record in the store)."""

    def __init__(self, req: ResponsesRequest, model_id: str, engine, parse: dict, items: list[dict],
                 context: list[dict], store: ResponseStore):
        self.req, self.model_id, self.engine, self.items, self.context, self.store = (
            req, model_id, engine, items, context, store)
        self.id, self.created_at = new_id("resp"), int(time.time())
        self.parser, self.output = ReplyParser(**parse), OutputItems()
        self.top_n = (req.top_logprobs or 0) if "message.output_text.logprobs" in (req.include or []) else None

    def feed(self, text: str, logprobs: list | None, final: bool) -> list[dict]:
        events = self.parser.feed(text) if text else []
        if final:
            events += self.parser.finish()
        lp = chat_logprobs(self.engine.token_text, logprobs, self.top_n)["content"] if logprobs else None
        return self.output.feed(events, lp)

    def body(self, status: str, usage: dict | None = None) -> dict:
        req, fmt = self.req, self.req.text.format if self.req.text and self.req.text.format else None
        choice = req.tool_choice if isinstance(req.tool_choice, str) or req.tool_choice is None else \
            req.tool_choice.model_dump()
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model_id,
            "output": self.output.items if status != "in_progress" else [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": req.reasoning.model_dump() if req.reasoning else None, "store": req.store,
            "temperature": req.temperature, "top_p": req.top_p, "top_logprobs": req.top_logprobs,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": choice or "auto", "tools": [t.model_dump() for t in req.tools or []],
            "truncation": req.truncation or "disabled", "metadata": req.metadata or {}, "user": req.user,
            "usage": usage}

    def finish(self, final) -> tuple[list[dict], dict]:
        """(the closing stream events, the response object) once the request's final output is in; stored when
        the request asked for it."""
        o = final.outputs[0]
        status = {"length": "incomplete", "abort": "cancelled"}.get(o.finish_reason, "completed")
        events = self.output.close(status)
        prompt, generated = len(final.prompt_token_ids), len(o.token_ids)
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": final.num_cached_tokens},
                 "output_tokens": generated, "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens(o)},
                 "total_tokens": prompt + generated}
        body = self.body(status, usage)
        if self.req.store:
            self.store.put(self.id, {"response": body, "items": self.items,
                                     "context": self.context + self.items + self.output.items})
        return events, body

    def reasoning_tokens(self, o) -> int:
        """Tokens up to and including the first `</think>` (all of them when it never came)."""
        if not any(item["type"] == "reasoning" for item in self.output.items):
            return 0
        close = self.engine.tokenizer.convert_tokens_to_ids("</think>")
        ids = list(o.token_ids)
        return ids.index(close) + 1 if close in ids else len(ids)


class ResponsesStream:
    """The typed event stream: response.created / in_progress, the items' events as the text arrives, then
    response.completed (or .incomplete) with the whole response and usage. Every event carries sequence_number;
    there is no [DONE]."""

    def __init__(self, turn: Turn, handles: list):
        self.turn, self.handles, self.seq, self.sent_lp = turn, handles, 0, 0

    def event(self, e: dict) -> bytes:
        e["sequence_number"], self.seq = self.seq, self.seq + 1
        return named_sse(e)

    def head(self) -> list[bytes]:
        body = self.turn.body("in_progress")
        return [self.event({"type": "response.created", "response": body}),
                self.event({"type": "response.in_progress", "response": body})]

    def render(self, _k: int, out) -> list[bytes]:
        o, lp = out.outputs[0], None
        if self.turn.top_n is not None and o.logprobs and len(o.logprobs) > self.sent_lp:
            lp, self.sent_lp = o.logprobs[self.sent_lp:], len(o.logprobs)
        return [self.event(e) for e in self.turn.feed(o.delta_text, lp, o.finished)]

    def tail(self) -> list[bytes]:
        events, body = self.turn.finish(self.handles[0].final)
        kind = "response.completed" if body["status"] == "completed" else "response.incomplete"
        return [self.event(e) for e in events] + [self.event({"type": kind, "response": body})]

    def error(self, exc: Exception) -> bytes:
        err = (exc.body() if isinstance(exc, APIError) else error_body(500, f"{type(exc).__name__}: {exc}"))["error"]
        return self.event({"type": "error", "code": err["code"], "message": err["message"], "param": err["param"]})

    def end(self) -> bytes:
        return b""


def add_routes(app: FastAPI, ctx: ServingContext, capacity: int = 512) -> None:
    store = ResponseStore(capacity)

    def translate(req: ResponsesRequest) -> tuple[ChatCompletionRequest, list[dict], list[dict]]:
        context = store.get(req.previous_response_id, "previous_response_id")["context"] \
            if req.previous_response_id else []
        items = normalized_items(req)
        return chat_request(req, context, items), context, items

    @app.post("/v1/responses", response_model=ResponseObject, responses=STREAMED)
    async def create_response(req: ResponsesRequest, raw: Request):
        """A model response; with `stream: true` an SSE stream of typed events ending in response.completed."""
        chat, context, items = translate(req)
        model_id, engine, jobs, parse = await prepare_chat(ctx, chat)
        turn = Turn(req, model_id, engine, parse, items, context, store)
        handles = cx.submit(engine, jobs, turn.id, req.stream)
        if req.stream:
            return SSEResponse(ResponsesStream(turn, handles))
        [final] = await cx.final_outputs(raw, handles)
        o = final.outputs[0]
        turn.feed(o.text, o.logprobs if turn.top_n is not None else None, True)
        return JSONResponse(turn.finish(final)[1])

    @app.post("/v1/responses/input_tokens", response_model=InputTokens, responses=ERRORS)
    async def input_tokens(req: ResponsesRequest):
        """The number of prompt tokens the same request to /v1/responses would have."""
        chat = translate(req)[0]
        _, engine = ctx.engine_for(chat.model)
        _, ids = await ctx.offload(cx.chat_prompt, engine.tokenizer, chat, ctx.prompt_limit(engine))
        return InputTokens(input_tokens=len(ids))

    @app.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=ERRORS)
    async def get_response(response_id: str):
        return JSONResponse(store.get(response_id)["response"])

    @app.delete("/v1/responses/{response_id}", response_model=ResponseDeleted, responses=ERRORS)
    async def delete_response(response_id: str):
        store.delete(response_id)
        return ResponseDeleted(id=response_id)

    @app.get("/v1/responses/{response_id}/input_items", response_model=InputItemList, responses=ERRORS)
    async def input_items(response_id: str, limit: int = Query(20, ge=1, le=100),
                          order: str = Query("desc", pattern="^(asc|desc)$"), after: str | None = None):
        items = list(store.get(response_id)["items"])
        if order == "desc":
            items.reverse()
        if after is not None:
            at = next((i for i, item in enumerate(items) if item["id"] == after), None)
            if at is None:
                raise APIError(400, f"no input item with id '{after}' in this response", param="after")
            items = items[at + 1:]
        page = items[:limit]
        return InputItemList(data=page, first_id=page[0]["id"] if page else None,
                             last_id=page[-1]["id"] if page else None, has_more=len(items) > limit)
