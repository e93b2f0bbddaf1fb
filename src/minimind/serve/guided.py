"""response_format (json_object / json_schema) and tool calls (tool_choice required / named) enforced by
constrained decoding with llguidance.

Each constrained sequence gets an LLMatcher through the engine's `SamplingParams.logits_processors` hook (one
GrammarProcessor per sequence: the engine clones it for every one of n): before every sample its allowed-token
bitmask sets every other logit to -inf, so the output is valid JSON (of the schema) by construction, and
end-of-sequence is only allowed once the value is complete. Rows without a grammar are untouched.

A tool-call grammar (tool_grammar) is a Lark grammar: the reply is one or more calls in the model family's format
(text/template.py TOOL_FORMATS), each the `{"name": ..., "arguments": ...}` of one of the allowed tools with the
arguments under `%json{}` of that tool's parameter schema; a prompt that opened a think block gets the reasoning and
`</think>` first. Tags that are tokens of their own (`<tool_call>` in minimind-3 and Qwen3) are matched as tokens.
"""
from __future__ import annotations

import json
import logging

import torch

from .errors import APIError

log = logging.getLogger("minimind.serve")
_BITS = torch.arange(32, dtype=torch.int32)


class GuidedDecoding:
    def __init__(self, llguidance):
        self.ll = llguidance
        self._tokenizers: dict[int, object] = {}  # id(hf tokenizer) -> LLTokenizer (about 1 s to build: cached)

    @classmethod
    def create(cls) -> GuidedDecoding | None:
        try:
            import llguidance
            import llguidance.hf
        except ImportError:
            return None
        return cls(llguidance)

    def lltokenizer(self, engine):
        tok = self._tokenizers.get(id(engine.tokenizer))
        if tok is None:
            tok = self._tokenizers[id(engine.tokenizer)] = self.ll.hf.from_tokenizer(engine.tokenizer)
        return tok

    def check(self, engine, grammar: str, what: str, param: str) -> str:
        """`grammar` when it compiles for the engine's tokenizer, else a 400 naming `param`."""
        is_error, messages = self.ll.LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer(engine))
        if is_error:
            raise APIError(400, f"{what} cannot be enforced: {messages[0]}", param=param)
        return grammar

    def add(self, engine, params, grammar: str) -> None:
        """Constrain `params`' sequences to a grammar that check() accepted."""
        processor = GrammarProcessor(self.ll, self.lltokenizer(engine), grammar)
        params.logits_processors = [*(params.logits_processors or []), processor]

    def tool_schemas(self, engine, tools: list) -> dict[str, dict]:
        """name -> parameter schema of each tool (Tool models); one that does not compile is a 400 naming it."""
        schemas = {}
        for i, tool in enumerate(tools):
            schema = tool_schema(tool.function.parameters)
            self.check(engine, self.ll.LLMatcher.grammar_from_lark("start: %json " + json.dumps(schema)),
                       f"the parameters of tool `{tool.function.name}`", f"tools[{i}].function.parameters")
            schemas[tool.function.name] = schema
        return schemas

    def tool_grammar(self, engine, schemas: dict[str, dict], fmt: str, parallel: bool, in_think: bool) -> str:
        """The checked grammar of a reply that is only calls of the tools in `schemas`."""
        lark = tool_grammar(list(schemas.items()), fmt, set(engine.tokenizer.get_added_vocab()), parallel=parallel,
                            in_think=in_think)
        return self.check(engine, self.ll.LLMatcher.grammar_from_lark(lark), "tool_choice", "tool_choice")

    def attach(self, engine, params, response_format) -> None:
        """Validate the grammar now (a bad schema is a 400) and add its processor to `params`."""
        if response_format.type == "json_object":
            schema = {"type": "object"}
        else:
            spec = response_format.json_schema
            if spec is None or spec.schema_ is None:
                raise APIError(400, "response_format.json_schema.schema is required for type json_schema",
                               param="response_format.json_schema")
            schema = spec.schema_
        try:
            # whitespace is free in JSON; a small model then rambles in spaces, so keep the form compact
            grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except ValueError as exc:
            raise APIError(400, f"invalid JSON schema: {exc}", param="response_format") from None
        self.add(engine, params, self.check(engine, grammar, "response_format", "response_format"))


def forced_tools(req) -> list | None:
    """The tools a reply must call (tool_choice "required": any of them, named: that one), None when the model
    chooses (auto) or may not call (none); a choice without tools or naming an unknown tool is a 400."""
    choice = req.tool_choice
    if choice is None or choice in ("auto", "none"):
        return None
    shown = choice if isinstance(choice, str) else "a named function"
    if not req.tools:
        raise APIError(400, f"tool_choice is {shown}, but the request has no tools", param="tool_choice")
    if choice == "required":
        return req.tools
    name = choice.function.get("name")
    named = [t for t in req.tools if t.function.name == name]
    if not named:
        known = ", ".join(f"`{t.function.name}`" for t in req.tools)
        raise APIError(400, f"tool_choice names the function `{name}`, which is not among the tools ({known})",
                       param="tool_choice")
    return named[:1]


COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # as json.dumps writes


def tool_schema(parameters: dict | None) -> dict:
    """A tool's parameter schema with the JSON layout the templates write; no parameters = no arguments."""
    schema = parameters if parameters is not None else {"type": "object", "properties": {},
                                                        "additionalProperties": False}
    own = schema.get("x-guidance")
    return {**schema, "x-guidance": {**COMPACT, **(own if isinstance(own, dict) else {})}}


def tool_grammar(tools: list[tuple[str, dict]], fmt: str, added_tokens: set[str], *, parallel: bool = True,
                 in_think: bool = False) -> str:
    """Lark grammar (llguidance dialect) of a reply made of calls to `tools` [(name, schema)] in format `fmt`
    ("object" | "list"); parallel=False: exactly one call."""
    def tag(text: str) -> str:  # a tag that is a token of its own can only be matched as that token
        return text if text in added_tokens else json.dumps(text)

    rules = []
    for i, (name, schema) in enumerate(tools):
        head = '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
        rules.append(f"fn_{i}: {json.dumps(head, ensure_ascii=False)} %json {json.dumps(schema)} " + '"}"')
    rules.append("fn: " + " | ".join(f"fn_{i}" for i in range(len(tools))))
    if fmt == "list":
        more = ' (", " fn)*' if parallel else ""
        rules.append(f'calls: {tag("<tool_call>")} "[" fn{more} "]" {tag("</tool_call>")}')
    else:
        more = ' ("\\n" call)*' if parallel else ""
        rules.append(f'call: {tag("<tool_call>")} "\\n" fn "\\n" {tag("</tool_call>")}')
        rules.append(f"calls: call{more}")
    if not in_think:
        rules.append("start: calls")
    elif "</think>" in added_tokens:  # special tokens cannot end a lazy lexeme; text never contains them anyway
        rules += ["start: think calls", 'think: THINK_TEXT </think> "\\n\\n"', "THINK_TEXT: /(.|\\n)*/"]
    else:
        rules += ["start: think calls", 'think[lazy]: /(.|\\n)*/ "</think>\\n\\n"']
    return "%llguidance {}\n" + "\n".join(rules) + "\n"


class GrammarProcessor:
    """Masks the logits of one sequence to the tokens its grammar allows next; `clone()` gives a fresh matcher."""

    def __init__(self, ll, tokenizer, grammar: str):
        self.ll, self.tokenizer, self.grammar = ll, tokenizer, grammar
        self.matcher = None  # built at the first call, on the engine thread
        self.consumed = 0

    def clone(self) -> GrammarProcessor:
        return GrammarProcessor(self.ll, self.tokenizer, self.grammar)

    def __call__(self, token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.matcher is None:
            self.matcher = self.ll.LLMatcher(self.tokenizer, self.grammar, log_level=0)
        new = token_ids[self.consumed:]
        if new:
            self.matcher.consume_tokens(new)
            self.consumed += len(new)
        if self.matcher.is_error():  # unconstrained from here on rather than a failed request
            log.warning("constrained decoding gave up: %s", self.matcher.get_error())
            return logits
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        bits = ((words[:, None] >> _BITS) & 1).bool().flatten()
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(logits.shape[-1], bits.numel())
        allowed[:n] = bits[:n]
        return logits.masked_fill(~allowed, float("-inf"))
