"""Chat prompts of every release, against strings written by hand from minimind-compat.md section 3, and the
reply parsers (think blocks, tool calls)."""
from __future__ import annotations

import copy
import json
from functools import cache

import pytest

from conftest import tokenizer_dir
from minimind.text.reply import parse_reply
from minimind.text.template import pretrain_prompt, render_prompt

V2, V2510, V3 = "minimind2", "minimind2-2510", "minimind-3"
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
USER = [{"role": "user", "content": "你好"}]
SYSTEM_USER = [{"role": "system", "content": "你是MiniMind"}, {"role": "user", "content": "你好"}]
MULTI = [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"},
         {"role": "user", "content": "再加1呢"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TOOL_JSON = '{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}'
TOOL_TURNS = [{"role": "user", "content": "北京天气"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
              {"role": "tool", "content": "晴"}]
TOOLS_SYSTEM = ("<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + TOOL_JSON +
                "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call><|im_end|>\n")
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
RESPONSE = "<|im_start|>user\n<tool_response>\n晴\n</tool_response><|im_end|>\n"
CLOSED_THINK = "<think>\n\n</think>\n\n"

# (tokenizer, messages, tools, open_thinking, expected) -- expected strings typed from the documented formats.
CASES = {
    "v2-user": (V2, USER, None, None,
                DEFAULT_SYSTEM + "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"),
    "v2-system": (V2, SYSTEM_USER, None, False,
                  "<|im_start|>system\n你是MiniMind<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"),
    "v2-multi": (V2, MULTI, None, True,  # MiniMind2 has no think switch: True changes nothing
                 DEFAULT_SYSTEM + "<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
                 "<|im_start|>user\n再加1呢<|im_end|>\n<|im_start|>assistant\n"),
    "2510-user-default": (V2510, USER, None, None,
                          DEFAULT_SYSTEM + "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"),
    "2510-user-think-off": (V2510, USER, None, False,
                            DEFAULT_SYSTEM + "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
                            + CLOSED_THINK),
    "2510-user-think-on": (V2510, USER, None, True,
                           DEFAULT_SYSTEM + "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"),
    "2510-system": (V2510, SYSTEM_USER, None, None,
                    ("<|im_start|>system\n你是MiniMind<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                    "<|im_start|>assistant\n")),
    "2510-multi": (V2510, MULTI, None, None,
                   DEFAULT_SYSTEM + "<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
                   "<|im_start|>user\n再加1呢<|im_end|>\n<|im_start|>assistant\n"),
    "2510-tools": (V2510, TOOL_TURNS, [TOOL], None,
                   TOOLS_SYSTEM + "<|im_start|>user\n北京天气<|im_end|>\n<|im_start|>assistant\n" + CALL +
                   "<|im_end|>\n" + RESPONSE + "<|im_start|>assistant\n"),
    "2510-tools-system": (V2510, [{"role": "system", "content": "S"}] + TOOL_TURNS[:1], [TOOL], False,
                          TOOLS_SYSTEM.replace("system\n", "system\nS\n\n", 1) +
                          "<|im_start|>user\n北京天气<|im_end|>\n<|im_start|>assistant\n" + CLOSED_THINK),
    "v3-user": (V3, USER, None, False, "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n" + CLOSED_THINK),
    "v3-user-default": (V3, USER, None, None,
                        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n" + CLOSED_THINK),
    "v3-user-think-on": (V3, USER, None, True, "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n<think>\n"),
    "v3-system": (V3, SYSTEM_USER, None, False,
                  "<|im_start|>system\n你是MiniMind<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                  "<|im_start|>assistant\n" + CLOSED_THINK),
    "v3-multi": (V3, MULTI, None, True,
                 "<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\n" + CLOSED_THINK + "2<|im_end|>\n"
                 "<|im_start|>user\n再加1呢<|im_end|>\n<|im_start|>assistant\n<think>\n"),
    "v3-history-reasoning": (V3, [{"role": "user", "content": "Q"},
                                  {"role": "assistant", "content": "<think>\nR\n</think>\n\nA"},
                                  {"role": "user", "content": "Q2"}], None, False,
                             "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nR\n</think>\n\nA"
                             "<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n" + CLOSED_THINK),
    "v3-tools": (V3, TOOL_TURNS, [TOOL], True,
                 TOOLS_SYSTEM + "<|im_start|>user\n北京天气<|im_end|>\n<|im_start|>assistant\n" + CLOSED_THINK + CALL +
                 "<|im_end|>\n" + RESPONSE + "<|im_start|>assistant\n<think>\n"),
}


@cache
def _load(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(name)))


def tok(name: str):
    tokenizer_dir(name)  # skip (not cached as an error) when ../shared is absent
    return _load(name)


@pytest.mark.parametrize("case", list(CASES))
def test_render_prompt_matches_documented_format(case):
    name, messages, tools, thinking, expected = CASES[case]
    assert render_prompt(tok(name), messages, tools=tools, open_thinking=thinking) == expected


@pytest.mark.parametrize("case", list(CASES))
def test_render_prompt_equals_transformers(case):
    name, messages, tools, thinking, _ = CASES[case]
    t = tok(name)
    kwargs = {} if thinking is None else {"open_thinking": thinking, "enable_thinking": thinking}
    direct = t.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
    assert render_prompt(t, messages, tools=tools, open_thinking=thinking) == direct


def test_without_generation_prompt():
    # MiniMind2 writes the assistant header after every user turn, even without a generation prompt.
    assert render_prompt(tok(V2), USER, add_generation_prompt=False).endswith("<|im_start|>assistant\n")
    assert render_prompt(tok(V3), USER, add_generation_prompt=False) == "<|im_start|>user\n你好<|im_end|>\n"


def test_no_chat_template_is_a_clear_error():
    t = copy.deepcopy(tok(V2))
    t.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(t, USER)


def test_pretrain_prompt_is_bos_plus_text():
    for name in (V2, V3):
        assert pretrain_prompt(tok(name), "你好") == "<|im_start|>你好"


def test_token_level_facts():
    for name in (V2, V2510, V3):
        t = tok(name)
        assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (1, 2, 0)
        assert t.encode("<|im_start|>", add_special_tokens=False) == [1]
        assert t.encode("<|im_end|>", add_special_tokens=False) == [2]
    v3 = tok(V3)
    assert v3.encode("<think>", add_special_tokens=False) == [25]
    assert v3.encode("<tool_call>", add_special_tokens=False) == [21]
    assert 25 not in v3.all_special_ids and 21 not in v3.all_special_ids
    assert v3.decode([25, 26], skip_special_tokens=True) == "<think></think>"  # survives skipping specials
    v2 = tok(V2)
    assert len(v2.encode("<think>", add_special_tokens=False)) > 1  # plain BPE text in MiniMind2
    assert v2.convert_tokens_to_ids("<think>") == v2.unk_token_id


def test_tokenizers_of_the_two_eras_differ():
    v2, v2510, v3 = tok(V2), tok(V2510), tok(V3)
    assert v2.get_vocab() == v2510.get_vocab()
    assert v2.encode("你好，世界") != v3.encode("你好，世界")
    # the compat notes count 6391 of 6400 ids naming a different token
    assert sum(v2.convert_ids_to_tokens(i) != v3.convert_ids_to_tokens(i) for i in range(6400)) == 6391


@pytest.mark.parametrize("text, started, expected", [
    ("<think>\nR\n</think>\n\nA", False, ("R", "A")),
    ("R\n</think>\n\nA", True, ("R", "A")),  # minimind-3 open_thinking: the prompt already opened the block
    ("R\n</think>\n\nA", False, ("", "R\n</think>\n\nA")),  # a reply that never opened the block: all content
    ("<think>\n\n</think>\n\nA", False, ("", "A")),
    ("just an answer", False, ("", "just an answer")),
    ("still thinking", True, ("still thinking", "")),
    ("<think>\nhalf way", False, ("half way", "")),
    ("", False, ("", "")),
])
def test_split_reasoning(text, started, expected):
    assert parse_reply(text, started_in_think=started)[:2] == expected


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    _, content, calls = parse_reply(text)
    return content, [c["function"] for c in calls]


def test_parse_tool_calls_one_call():
    content, calls = parse_tool_calls('我查一下。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}'
                                      '\n</tool_call>')
    assert content == "我查一下。"
    assert [c["name"] for c in calls] == ["get_weather"]
    assert isinstance(calls[0]["arguments"], str) and json.loads(calls[0]["arguments"]) == {"city": "北京"}
    assert "北京" in calls[0]["arguments"]  # not \\u-escaped


def test_parse_tool_calls_whitespace_and_string_arguments():
    text = ('<tool_call>{"name":"a","arguments":{}}</tool_call>  \n<tool_call>\n\n  {"name": "b", '
            '"arguments": "{\\"x\\": 1}"}  \n\n</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert calls == [{"name": "a", "arguments": "{}"}, {"name": "b", "arguments": '{"x": 1}'}]


@pytest.mark.parametrize("text", [
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>["get_weather"]</tool_call>',
    'unclosed <tool_call>{"name": "a", "arguments": {}}',
    "no calls at all",
])
def test_parse_tool_calls_leaves_invalid_blocks_as_content(text):
    assert parse_tool_calls(text) == (text, [])


def test_parse_tool_calls_keeps_invalid_next_to_valid():
    content, calls = parse_tool_calls('<tool_call>{bad}</tool_call>\n<tool_call>{"name": "a"}</tool_call>')
    assert content == "<tool_call>{bad}</tool_call>"
    assert calls == [{"name": "a", "arguments": "{}"}]


# ---------------------------------------------------------------- tools in templates that do not render them
TOOL2 = {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
TWO_CALLS = [{"role": "user", "content": "北京天气, 1+2"},
             {"role": "assistant", "content": "我查一下。", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
                 {"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
             {"role": "tool", "content": "晴"}, {"role": "tool", "content": "3"},
             {"role": "assistant", "content": "晴, 3"}, {"role": "user", "content": "谢谢"}]


@pytest.mark.parametrize("messages", [TOOL_TURNS, [{"role": "system", "content": "S"}] + TWO_CALLS, TWO_CALLS, USER],
                         ids=["one-call", "system-two-calls", "two-calls", "no-history"])
def test_minimind2_gets_the_2510_tool_prompt(messages):
    """MiniMind2's template drops tools and tool results; we write them in, and the prompt is the one 2510's own
    template renders for the same conversation (its think switch left at its default)."""
    tools = [TOOL, TOOL2]
    ours = render_prompt(tok(V2), messages, tools=tools, open_thinking=None)
    assert ours == tok(V2510).apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def test_minimind2_history_without_tools_keeps_the_tool_turns():
    """tool_choice none renders no tool list, but the calls and results already in the history stay."""
    ours = render_prompt(tok(V2), TOOL_TURNS)
    assert ours == DEFAULT_SYSTEM + "<|im_start|>user\n北京天气<|im_end|>\n<|im_start|>assistant\n" + CALL + \
        "<|im_end|>\n" + RESPONSE + "<|im_start|>assistant\n"


@cache
def _smollm():
    from minimind.checkpoint.default_model import find_default_gguf
    from minimind.checkpoint.gguf_reader import gguf_tokenizer

    return gguf_tokenizer(find_default_gguf())


def smollm():
    from minimind.errors import CheckpointError

    try:
        return _smollm()
    except CheckpointError as exc:
        pytest.skip(f"no SmolLM2 GGUF: {exc}")


def test_smollm2_tools_in_its_authors_format():
    """SmolLM2's authors put json.dumps(tools) between <tools> tags in the system turn and read back one
    <tool_call>[...]</tool_call> block; its GGUF template by itself drops the tools (checked first)."""
    from minimind.text.template import tool_format

    t = smollm()
    assert "get_weather" not in t.apply_chat_template(TOOL_TURNS[:1], tools=[TOOL], tokenize=False)
    assert tool_format(t) == "list" and tool_format(tok(V3)) == tool_format(tok(V2)) == "object"
    tools = [TOOL, TOOL2]
    text = render_prompt(t, [{"role": "system", "content": "Be brief."}] + TWO_CALLS, tools=tools)
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nBe brief.\n\n")
    assert "<tools>" + json.dumps(tools, ensure_ascii=False) + "</tools>" in system
    assert rest == (
        "<|im_start|>user\n北京天气, 1+2<|im_end|>\n<|im_start|>assistant\n我查一下。\n<tool_call>["
        '{"name": "get_weather", "arguments": {"city": "北京"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}'
        "]</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n晴\n</tool_response>\n<tool_response>\n3\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n晴, 3<|im_end|>\n<|im_start|>user\n谢谢<|im_end|>\n"
        "<|im_start|>assistant\n")
    plain = render_prompt(t, USER)  # no tools: the template's own default system prompt
    assert "<tools>" not in plain and "SmolLM" in plain


@pytest.mark.parametrize("name", [V2, V3, "smollm2"])
def test_rendered_calls_parse_back(name):
    """The calls a template writes into the history are the calls the reply parser reads from a reply."""
    from minimind.text.template import inline_tools, tool_format

    t = smollm() if name == "smollm2" else tok(name)
    assistant = inline_tools(TWO_CALLS[1:2], None, tool_format(t))[0]["content"]
    content, calls = parse_tool_calls(assistant)
    assert content == "我查一下。"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "北京"}),
                                                                         ("add", {"a": 1, "b": 2})]


@pytest.mark.parametrize("text, names", [
    ('<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b"}]</tool_call>', ["a", "b"]),
    ('<tool_call>[\n{"name": "a", "arguments": {}}\n]</tool_call>\n<tool_call>{"name": "c"}</tool_call>', ["a", "c"]),
    ("<tool_call>[]</tool_call>", []),
    ('<tool_call>[{"name": "a"}, "b"]</tool_call>', []),
])
def test_parse_tool_call_lists(text, names):
    content, calls = parse_tool_calls(text)
    assert [c["name"] for c in calls] == names
    assert content == ("" if names else text)
