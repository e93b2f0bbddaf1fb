"""The Anthropic Messages API (POST /v1/messages, POST /v1/messages/count_tokens) as a translation onto the
chat-completions machinery: messages and content blocks -> ChatCompletionRequest -> prepare_chat + submit
(completions.py, context.py), and the reply parser's events -> content blocks (thinking, text, tool_use), whole or
as Anthropic's event stream. Errors under /v1/messages answer in Anthropic's shape (errors.py).

A final assistant turn (a prefill for the model to continue) is refused with a 400: the chat template closes every
turn it renders.
"""
from __future__ import annotations

import json
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..text.reply import ReplyParser
from . import context as cx
from .anthropic_protocol import AnthropicError, CountTokensRequest, MessageResponse, MessagesRequest, TokenCount
from .completions import prepare_chat
from .context import ServingContext
from .errors import APIError, anthropic_error_body
from .protocol import ChatCompletionRequest, TextPart
from .sse import SSEResponse, named_sse

ERRORS = {code: {"model": AnthropicError} for code in (400, 401, 404, 429, 500, 503)}
STREAMED = {**ERRORS, 200: {"description": "the message; with `stream: true` an SSE stream of Anthropic's events",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def _refuse(kind: str, where: str) -> None:
    if kind in ("image", "document"):
        cx.part_text(TextPart(type="image" if kind == "image" else "file"), where)  # the chat API's media 400
    raise APIError(400, f"{where}: a `{kind}` block cannot appear in this turn", param=where)


def _result_text(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for j, b in enumerate(content):
        if b.type != "text":
            _refuse(b.type, f"{where}.content[{j}]")
    return "".join(b.text for b in content)


def chat_messages(req: CountTokensRequest) -> list[dict]:
    """Anthropic turns -> chat messages: tool_use blocks are the assistant's tool_calls, each tool_result a `tool`
    message (in block order, text around them a user message), thinking blocks the reasoning_content."""
    system = req.system if isinstance(req.system, str) or req.system is None else "\n".join(
        b.text for b in req.system)
    messages = [{"role": "system", "content": system}] if system else []
    if req.messages[-1].role == "assistant":
        raise APIError(400, "the last message is an assistant turn (a prefill to continue); this server answers a "
                            "user turn only", param=f"messages[{len(req.messages) - 1}]")
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        text, calls, thinking, results = "", [], None, 0
        for j, b in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if b.type == "text":
                text += b.text
            elif b.type == "tool_use" and m.role == "assistant":
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
            elif b.type == "thinking" and m.role == "assistant":
                thinking = (thinking or "") + b.thinking
            elif b.type == "redacted_thinking" and m.role == "assistant":
                continue  # opaque to this model
            elif b.type == "tool_result" and m.role == "user":
                if text:
                    messages.append({"role": "user", "content": text})
                    text = ""
                messages.append({"role": "tool", "tool_call_id": b.tool_use_id,
                                 "content": _result_text(b.content, where)})
                results += 1
            else:
                _refuse(b.type, where)
        if m.role == "assistant":
            d = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:
                d["tool_calls"] = calls
            if thinking is not None:
                d["reasoning_content"] = thinking
            messages.append(d)
        elif text or not results:
            messages.append({"role": "user", "content": text})
    return messages


def chat_request(req: CountTokensRequest, **sampling) -> ChatCompletionRequest:
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.input_schema or {"type": "object"}}}
             for t in req.tools or [] if t.type in (None, "custom")]
    choice, parallel = None, None
    if req.tool_choice is not None:
        tc = req.tool_choice
        if tc.type == "tool" and not tc.name:
            raise APIError(400, "tool_choice.name is required for type tool", param="tool_choice.name")
        choice = {"auto": "auto", "any": "required", "none": "none"}.get(tc.type) or \
            {"type": "function", "function": {"name": tc.name}}
        parallel = None if tc.disable_parallel_tool_use is None else not tc.disable_parallel_tool_use
    fmt = req.output_config.format if req.output_config else None
    thinking = None if req.thinking is None else {"open_thinking": req.thinking.type != "disabled"}
    return ChatCompletionRequest(
        model=req.model, messages=chat_messages(req), tools=tools or None, tool_choice=choice if tools else None,
        parallel_tool_calls=parallel, chat_template_kwargs=thinking,
        response_format=None if fmt is None else {"type": "json_schema",
                                                  "json_schema": {"name": "output", "schema": fmt.schema_}},
        **sampling)


def _tool_input(arguments: str) -> dict:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


class ContentBlocks:
    """The content blocks the reply parser's events make, and the stream events that build them. Streamed and
    whole messages both go through it, so they are the same blocks."""

    def __init__(self):
        self.blocks: list[dict] = []
        self.open: dict | None = None  # the thinking or text block text is going into

    def feed(self, events: list) -> list[dict]:
        out: list[dict] = []
        for kind, value in events:
            if kind == "tool_call":
                out += self.close()
                fn = value["function"]
                block = {"type": "tool_use", "id": "toolu_" + value["id"].removeprefix("call_"), "name": fn["name"],
                         "input": _tool_input(fn["arguments"])}
                self.blocks.append(block)
                i = len(self.blocks) - 1
                out += [{"type": "content_block_start", "index": i, "content_block": {**block, "input": {}}},
                        {"type": "content_block_delta", "index": i, "delta": {
                            "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}},
                        {"type": "content_block_stop", "index": i}]
                continue
            key = "thinking" if kind == "reasoning" else "text"
            if self.open is None or self.open["type"] != key:
                out += self.close()
                self.open = {"type": "thinking", "thinking": "", "signature": ""} if key == "thinking" else \
                    {"type": "text", "text": ""}
                self.blocks.append(self.open)
                out.append({"type": "content_block_start", "index": len(self.blocks) - 1,
                            "content_block": dict(self.open)})
            self.open[key] += value
            out.append({"type": "content_block_delta", "index": len(self.blocks) - 1,
                        "delta": {"type": f"{key}_delta", key: value}})
        return out

    def close(self) -> list[dict]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": len(self.blocks) - 1}]


def stop_of(o, blocks: list[dict]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished output."""
    if o.finish_reason == "length":
        return "max_tokens", None
    if any(b["type"] == "tool_use" for b in blocks):
        return "tool_use", None
    if isinstance(o.stop_reason, str):
        return "stop_sequence", o.stop_reason
    return "end_turn", None


class MessageStream:
    """message_start and a ping, each block's start / deltas / stop as the text arrives, then message_delta (stop
    reason, cumulative usage) and message_stop. No [DONE]."""

    def __init__(self, message_id: str, model_id: str, handles: list, parse: dict):
        self.id, self.model_id, self.handles = message_id, model_id, handles
        self.parser, self.blocks = ReplyParser(**parse), ContentBlocks()
        self.prompt_tokens = len(handles[0].prompt_token_ids)

    def head(self) -> list[bytes]:
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model_id, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0}}
        return [named_sse({"type": "message_start", "message": message}), named_sse({"type": "ping"})]

    def render(self, _k: int, out) -> list[bytes]:
        o = out.outputs[0]
        events = self.parser.feed(o.delta_text) if o.delta_text else []
        if o.finished:
            events += self.parser.finish()
        return [named_sse(e) for e in self.blocks.feed(events) + (self.blocks.close() if o.finished else [])]

    def tail(self) -> list[bytes]:
        o = self.handles[0].final.outputs[0]
        reason, sequence = stop_of(o, self.blocks.blocks)
        return [named_sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                           "usage": {"input_tokens": self.prompt_tokens, "output_tokens": len(o.token_ids)}}),
                named_sse({"type": "message_stop"})]

    def error(self, exc: Exception) -> bytes:
        status, message = (exc.status, exc.message) if isinstance(exc, APIError) else \
            (500, f"{type(exc).__name__}: {exc}")
        return named_sse(anthropic_error_body(status, message))

    def end(self) -> bytes:
        return b""


def add_routes(app: FastAPI, ctx: ServingContext) -> None:
    @app.post("/v1/messages", response_model=MessageResponse, responses=STREAMED)
    async def create_message(req: MessagesRequest, raw: Request):
        """A message; with `stream: true` an SSE stream of Anthropic's events (message_start ... message_stop)."""
        chat = chat_request(req, max_tokens=req.max_tokens, stop=req.stop_sequences, temperature=req.temperature,
                            top_p=req.top_p, top_k=req.top_k, stream=req.stream)
        model_id, engine, jobs, parse = await prepare_chat(ctx, chat)
        message_id = f"msg_{uuid.uuid4().hex}"
        handles = cx.submit(engine, jobs, message_id, req.stream)
        if req.stream:
            return SSEResponse(MessageStream(message_id, model_id, handles, parse))
        [final] = await cx.final_outputs(raw, handles)
        o, parser, blocks = final.outputs[0], ReplyParser(**parse), ContentBlocks()
        blocks.feed(parser.feed(o.text) + parser.finish())
        reason, sequence = stop_of(o, blocks.blocks)
        return JSONResponse({"id": message_id, "type": "message", "role": "assistant", "model": model_id,
                             "content": blocks.blocks, "stop_reason": reason, "stop_sequence": sequence,
                             "usage": {"input_tokens": len(final.prompt_token_ids),
                                       "output_tokens": len(o.token_ids)}})

    @app.post("/v1/messages/count_tokens", response_model=TokenCount, responses=ERRORS)
    async def count_tokens(req: CountTokensRequest):
        """The number of prompt tokens the same request to /v1/messages would have."""
        chat = chat_request(req)
        _, engine = ctx.engine_for(chat.model)
        _, ids = await ctx.offload(cx.chat_prompt, engine.tokenizer, chat, ctx.prompt_limit(engine))
        return TokenCount(input_tokens=len(ids))
