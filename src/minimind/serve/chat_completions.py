"""POST /v1/chat/completions: prompt from the checkpoint's own chat template, streamed or whole answers with
reasoning_content and tool_calls split out of the text (text/reply.py)."""
from __future__ import annotations

from fastapi import Request

from ..text.reply import ReplyParser, collect
from .context import ServingContext, final_outputs, submit
from .errors import APIError
from .formatting import chat_logprob_entries, whole_response
from .params import chat_prompt, check_stream_options
from .protocol import ChatCompletionRequest, random_id
from .sse import SSEResponse, StreamRenderer


def prepare_chat(ctx: ServingContext, req: ChatCompletionRequest):
    """Everything that can fail with a 4xx, done before the response starts."""
    model_id, engine = ctx.engine_for(req.model)
    check_stream_options(req)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    text, ids = chat_prompt(engine.tokenizer, req)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    jobs = ctx.requests_for(engine, req, [ids], "messages", requested, logprobs,
                            "response_format needs constrained decoding: install the `serve` extra (llguidance)")
    parse = {"started_in_think": text.rstrip(" ").endswith(("<think>", "<think>\n")),
             "parse_tools": bool(req.tools) and req.tool_choice != "none"}
    return model_id, engine, jobs, parse


def finish_reason(reason: str | None, has_tool_calls: bool) -> str | None:
    return "tool_calls" if reason == "stop" and has_tool_calls else reason


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request):
    model_id, engine, jobs, parse = prepare_chat(ctx, req)
    response_id = random_id("chatcmpl")
    handles = submit(engine, jobs, response_id, req.stream)
    if req.stream:
        return SSEResponse(ChatStream(req, handles, response_id, model_id, engine.token_text, parse))
    finals = await final_outputs(raw, handles)
    top_n = jobs[0][1].logprobs
    choices = []
    for o in finals[0].outputs:
        p = ReplyParser(**parse)
        reasoning, content, calls = collect(p.feed(o.text) + p.finish())
        message = {"role": "assistant", "content": content if (content or not calls) else None,
                   "reasoning_content": reasoning or None,
                   "tool_calls": [{k: v for k, v in c.items() if k != "index"} for c in calls]}
        lp = None if top_n is None else {"content": chat_logprob_entries(engine.token_text, o.logprobs or [], top_n)}
        choices.append({"index": o.index, "message": message, "logprobs": lp,
                        "finish_reason": finish_reason(o.finish_reason, bool(calls)), "stop_reason": o.stop_reason})
    return whole_response(response_id, "chat.completion", model_id, finals, choices)


def _choice(index: int, delta: dict, logprobs=None, finish: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


class ChatStream(StreamRenderer):
    """A role chunk per choice, then deltas of content / reasoning_content / tool_calls as the parser splits them
    out, a finish chunk per choice, and the usage chunk when stream_options asks for it."""

    object = "chat.completion.chunk"

    def __init__(self, req: ChatCompletionRequest, handles: list, response_id: str, model_id: str, token_text,
                 parse: dict):
        super().__init__(req, handles, response_id, model_id, token_text)
        self.parsers = [ReplyParser(**parse) for _ in range(req.n)]
        self.top_n = (req.top_logprobs or 0) if req.logprobs else None

    def head(self) -> list[bytes]:
        return [self.chunk(_choice(i, {"role": "assistant", "content": ""})) for i in range(len(self.parsers))]

    def render(self, _k: int, out) -> list[bytes]:
        chunks = []
        for o in out.outputs:
            i = o.index
            self.generated[i] = len(o.token_ids)
            events = self.parsers[i].feed(o.delta_text) if o.delta_text else []
            if o.finished:
                events += self.parsers[i].finish()
            lp = None
            if self.top_n is not None and (events or o.finished) and (new := self.new_logprobs(i, o)):
                lp = {"content": chat_logprob_entries(self.token_text, new, self.top_n)}
            delta: dict = {}
            for kind, value in events:
                if kind == "tool_call":
                    delta.setdefault("tool_calls", []).append(value)
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
