"""The reply parser: a chat reply split into reasoning, content and tool calls, as its text arrives.

MiniMind writes `<think>...</think>` before its answer (minimind-3 with open_thinking starts inside the block,
because the prompt already ends in `<think>\\n`) and `<tool_call>{json}</tool_call>` blocks for tools (SmolLM2
writes one `<tool_call>[{json}, ...]</tool_call>` block for all its calls). Streamed and whole replies go through
this one parser, in the server, the terminal chat and the web UIs. Text that might be the start of a tag is held
back until it is decided.
"""
from __future__ import annotations

import json
import re
import uuid

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
# the head of a call as the tool grammar (serve/guided.py) writes it, in either format
_CALL_HEAD = re.compile(r'\s*[\[,]?\s*\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (text to hold back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _new_call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _call(value) -> dict | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return _new_call(value["name"], args)


def parse_tool_body(body: str) -> list[dict] | None:
    """The calls in one block: a JSON object (one call: MiniMind, Qwen3) or a non-empty JSON list of them
    (SmolLM2); None when it is neither."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    calls = [_call(v) for v in (value if isinstance(value, list) else [value])]
    return calls if calls and None not in calls else None


class ReplyParser:
    """feed(text) / finish() -> list of ("reasoning" | "content", str) or ("tool_call", dict) events.

    A tool_call event is a whole call ({"index", "id", "type", "function": {"name", "arguments"}}) once its block is
    complete. tools_enforced (the calls come from the tool grammar, so their layout is known) with
    stream_tool_calls streams a call as OpenAI's deltas do instead: a first event as soon as its name is known
    (arguments ""), then {"index", "function": {"arguments": piece}} events as its arguments arrive, written as
    generated; collect() joins them.
    """

    def __init__(self, *, started_in_think: bool = False, parse_tools: bool = False, parse_reasoning: bool = True,
                 tools_enforced: bool = False, stream_tool_calls: bool = False):
        # "start" decides between a think block and plain content; a prompt that opened the block already
        # (started_in_think) may still see the model repeat `<think>`, which is dropped.
        self.mode = "start" if (parse_reasoning or started_in_think) else "content"
        self.started_in_think = started_in_think
        self.parse_tools = parse_tools
        self.stream_calls = tools_enforced and stream_tool_calls
        self.depth: int | None = None  # streamed arguments: bracket depth inside them; None between calls
        self.in_string = self.escaped = False
        self.block_calls = 0  # calls streamed from the current block
        self.buf = ""
        self.content_started = False
        self.after_think = False  # leading newlines after </think> are dropped (as split_reasoning does)
        self.reasoning_started = False
        self.ws_hold = ""  # whitespace that may only separate tool calls
        self.num_tool_calls = 0

    def feed(self, text: str) -> list:
        self.buf += text
        events: list = []
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list:
        events: list = []
        while self._step(events, final=True):
            pass
        if self.mode == "tool" and self.block_calls:  # cut short (max_tokens) inside a streamed call
            pass
        elif self.mode == "tool":  # an unterminated block stays visible as text, its tag included
            self._content(events, TOOL_OPEN + self.buf)
        elif self.mode == "think":  # unterminated: everything is reasoning, as split_reasoning has it
            self._reasoning(events, self.buf)
        elif self.buf:
            self._content(events, self.buf)
        self.buf = ""
        if not self.num_tool_calls and self.ws_hold:
            events.append(("content", self.ws_hold))
        return events

    # one state transition; True when it consumed something and another may follow
    def _step(self, events: list, final: bool) -> bool:
        buf = self.buf
        if self.mode == "start":
            stripped = buf.lstrip()
            if stripped.startswith(THINK_OPEN):
                self.buf, self.mode = stripped[len(THINK_OPEN):], "think"
                return True
            if not final and THINK_OPEN.startswith(stripped):
                return False  # could still become <think>
            self.mode = "think" if self.started_in_think else "content"
            return True
        if self.mode == "think":
            at = buf.find(THINK_CLOSE)
            if at >= 0:
                self._reasoning(events, buf[:at].rstrip("\n"))
                self.buf, self.mode, self.after_think = buf[at + len(THINK_CLOSE):], "content", True
                return True
            keep = _partial_tail(buf, THINK_CLOSE)
            emit = buf[:len(buf) - keep]
            safe = emit.rstrip("\n")  # newlines right before </think> are not part of the reasoning
            self._reasoning(events, safe)
            self.buf = buf[len(safe):]
            return False
        if self.mode == "content":
            if self.parse_tools:
                at = buf.find(TOOL_OPEN)
                if at >= 0:
                    self._content(events, buf[:at])
                    self.buf, self.mode, self.block_calls = buf[at + len(TOOL_OPEN):], "tool", 0
                    return True
                keep = 0 if final else _partial_tail(buf, TOOL_OPEN)
            else:
                keep = 0
            self._content(events, buf[:len(buf) - keep])
            self.buf = buf[len(buf) - keep:]
            return False
        # mode == "tool"
        if self.stream_calls:
            return self._stream_call(events)
        at = buf.find(TOOL_CLOSE)
        if at < 0:
            return False
        calls = parse_tool_body(buf[:at].strip())
        if calls is None:
            self._content(events, TOOL_OPEN + buf[:at + len(TOOL_CLOSE)])
        for call in calls or []:
            call["index"] = self.num_tool_calls
            self.num_tool_calls += 1
            self.ws_hold = ""
            events.append(("tool_call", call))
        self.buf, self.mode = buf[at + len(TOOL_CLOSE):], "content"
        return True

    def _stream_call(self, events: list) -> bool:
        buf = self.buf
        if self.depth is None:  # between calls: the next call's head, or the end of the block
            head = _CALL_HEAD.match(buf)
            if head:
                call = _new_call(json.loads(head.group(1)), "")
                events.append(("tool_call", {"index": self.num_tool_calls, **call}))
                self.num_tool_calls, self.block_calls, self.ws_hold = self.num_tool_calls + 1, self.block_calls + 1, ""
                self.buf, self.depth = buf[head.end():], 0
                return True
            at = buf.find(TOOL_CLOSE)
            if at >= 0:
                self.buf, self.mode = buf[at + len(TOOL_CLOSE):], "content"
                return True
            return False
        for i, ch in enumerate(buf):  # the arguments end at the bracket that closes the call's own object
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                if self.depth == 0:
                    self._arguments(events, buf[:i])
                    self.buf, self.depth = buf[i + 1:], None
                    return True
                self.depth -= 1
        self._arguments(events, buf)
        self.buf = ""
        return False

    def _arguments(self, events: list, piece: str) -> None:
        if piece:
            events.append(("tool_call", {"index": self.num_tool_calls - 1, "function": {"arguments": piece}}))

    def _reasoning(self, events: list, text: str) -> None:
        if not self.reasoning_started:
            text = text.lstrip("\n")
        if text:
            self.reasoning_started = True
            events.append(("reasoning", text))

    def _content(self, events: list, text: str) -> None:
        if not text:
            return
        if self.after_think and not self.content_started:
            text = text.lstrip("\n")  # the blank line after </think> belongs to the template, not the answer
            if not text:
                return
        if self.parse_tools and not text.strip():
            self.ws_hold += text  # may only separate tool calls; emitted once real text follows
            return
        text, self.ws_hold = self.ws_hold + text, ""
        self.content_started = True
        events.append(("content", text))


def collect(events: list) -> tuple[str, str, list[dict]]:
    """(reasoning, content, tool_calls) of a whole event list."""
    reasoning = "".join(t for k, t in events if k == "reasoning")
    content = "".join(t for k, t in events if k == "content")
    by_index: dict[int, dict] = {}
    for kind, value in events:
        if kind == "tool_call" and value["index"] in by_index:  # a streamed call's next piece of arguments
            by_index[value["index"]]["function"]["arguments"] += value["function"]["arguments"]
        elif kind == "tool_call":
            by_index[value["index"]] = {**value, "function": dict(value["function"])}
    calls = list(by_index.values())
    return reasoning, (content.strip() if calls else content), calls


def parse_reply(text: str, *, started_in_think: bool = False, parse_tools: bool = True) -> tuple[str, str, list[dict]]:
    """(reasoning, content, tool_calls) of a whole reply; tool calls in the OpenAI shape
    ({"id", "type": "function", "function": {"name", "arguments"}, "index"}), `arguments` a JSON string. A
    `<tool_call>` block whose body is not a JSON object with a "name" stays in the content untouched."""
    parser = ReplyParser(started_in_think=started_in_think, parse_tools=parse_tools)
    return collect(parser.feed(text) + parser.finish())
