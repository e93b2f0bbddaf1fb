"""Tool calls through `minimind serve` with the official openai client (and LangChain) over loopback: tool_choice
required / named / none / auto, parallel_tool_calls, streaming. The models are tiny and random, so only the
grammar makes a reply a valid call: the calls are checked with jsonschema against the tools' own schemas. Two
formats: minimind-3's (one `<tool_call>` block per call, the tags are tokens) and SmolLM2's (one block holding a JSON
list, the tags are text; tokenizer from the default model's GGUF)."""
from __future__ import annotations

import json

import httpx
import pytest

from conftest import serve, tiny_model, tokenizer_dir
from test_serve import script

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name} tool", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]
FAMILIES = ["mm3", "smol"]


def smollm_tokenizer():
    from minimind.checkpoint.default_model import find_default_gguf
    from minimind.checkpoint.gguf_reader import gguf_tokenizer
    from minimind.errors import CheckpointError

    try:
        return gguf_tokenizer(find_default_gguf())
    except CheckpointError as exc:
        pytest.skip(f"no SmolLM2 tokenizer: {exc}")


@pytest.fixture(scope="module")
def server():
    from transformers import AutoTokenizer

    from minimind.engine import LLM
    from minimind.serve import create_app

    mm3 = AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind-3")))
    smol = smollm_tokenizer()
    scripted = LLM(tiny_model("minimind2", vocab_size=len(smol), seed=2), tokenizer=smol, max_num_seqs=2,
                   max_model_len=1024)
    holder = {"text": "hello"}
    script(scripted, smol, holder)
    engines = {"mm3": LLM(tiny_model("minimind3", vocab_size=6400), tokenizer=mm3, max_num_seqs=2, max_model_len=1024),
               "smol": LLM(tiny_model("minimind2", vocab_size=len(smol), seed=1), tokenizer=smol, max_num_seqs=2,
                           max_model_len=1024),
               "scripted": scripted}
    with serve(create_app(engines)) as url:
        yield {"url": url, "holder": holder, "tokenizers": {"mm3": mm3, "smol": smol}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def checked_calls(choice) -> list[tuple[str, dict]]:
    """(name, arguments) of each call, every one validated against its tool's schema."""
    assert choice.finish_reason == "tool_calls", choice.message
    calls = []
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        calls.append((call.function.name, args))
    assert calls and choice.message.content is None
    return calls


@pytest.mark.parametrize("model", FAMILIES)
def test_required_gives_valid_calls(client, model):
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model=model, messages=MSG, tools=TOOLS, tool_choice="required",
                                           max_tokens=300, temperature=1.0, seed=seed)
        checked_calls(r.choices[0])


@pytest.mark.parametrize("model", FAMILIES)
def test_named_and_single_call(client, model):
    named = {"type": "function", "function": {"name": "add"}}
    for seed in (1, 2):
        r = client.chat.completions.create(model=model, messages=MSG, tools=TOOLS, tool_choice=named,
                                           max_tokens=300, temperature=1.0, seed=seed)
        assert {name for name, _ in checked_calls(r.choices[0])} == {"add"}
        r = client.chat.completions.create(model=model, messages=MSG, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=300, temperature=1.0, seed=seed)
        assert len(checked_calls(r.choices[0])) == 1


@pytest.mark.parametrize("model", FAMILIES)
def test_streamed_calls_reassemble_to_the_whole_reply(client, model):
    kwargs = dict(model=model, messages=MSG, tools=TOOLS, tool_choice="required", max_tokens=300, temperature=1.0,
                  seed=1)
    whole = checked_calls(client.chat.completions.create(**kwargs).choices[0])
    calls: dict[int, dict] = {}
    finish, pieces = None, 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        assert not delta.content
        for tc in delta.tool_calls or []:
            if tc.index not in calls:  # the first delta of a call names it; later ones only add arguments
                assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                calls[tc.index] = {"name": tc.function.name, "arguments": ""}
            else:
                assert tc.id is None and tc.function.name is None
                pieces += 1
            calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and pieces > len(calls)  # the arguments came as they were generated
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == whole


@pytest.mark.parametrize("text", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", '
     '"arguments": {"city": "a}\\"]{", "unit": "celsius"}}\n</tool_call>'),
    ('plan\n</think>\n\n<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "f", "arguments": '
     '{"x": [1, {"y": "]"}]}}]</tool_call>'),
])
def test_enforced_calls_stream_the_same_however_chunked(text):
    """Under the tool grammar the parser streams each call (name first, then its arguments as generated); the
    pieces join to the calls the whole text gives, written as generated, for any chunking."""
    import random
    import re

    from minimind.text.reply import ReplyParser, collect

    think = text.startswith("plan")
    whole = ReplyParser(parse_tools=True, started_in_think=think, tools_enforced=True, stream_tool_calls=True)
    reasoning, content, calls = collect(whole.feed(text) + whole.finish())
    bodies = [json.loads(b) for b in re.findall("<tool_call>(.*?)</tool_call>", text, re.DOTALL)]
    expected = [c for b in bodies for c in (b if isinstance(b, list) else [b])]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (c["name"], c["arguments"]) for c in expected]
    assert all(c["function"]["arguments"] in text for c in calls) and content == ""
    rng = random.Random(0)
    for _ in range(30):
        p = ReplyParser(parse_tools=True, started_in_think=think, tools_enforced=True, stream_tool_calls=True)
        events, i = [], 0
        while i < len(text):
            j = i + rng.randint(1, 6)
            events += p.feed(text[i:j])
            i = j
        events += p.finish()
        starts = [v for k, v in events if k == "tool_call" and "id" in v]
        assert [v["function"]["name"] for v in starts] == [c["function"]["name"] for c in calls]
        got = collect(events)
        assert (got[0], got[1]) == (reasoning, content)
        assert [c["function"] for c in got[2]] == [c["function"] for c in calls]


def test_none_renders_no_tools_and_parses_nothing(client, server):
    mm3 = server["tokenizers"]["mm3"]
    expected = {tools is not None: len(mm3.encode(mm3.apply_chat_template(MSG, tools=tools, add_generation_prompt=True,
                                                                            tokenize=False), add_special_tokens=False))
                for tools in (None, TOOLS)}
    auto = client.chat.completions.create(model="mm3", messages=MSG, tools=TOOLS, max_tokens=1)
    none = client.chat.completions.create(model="mm3", messages=MSG, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert (auto.usage.prompt_tokens, none.usage.prompt_tokens) == (expected[True], expected[False])
    server["holder"]["text"] = '<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}]</tool_call>'
    r = client.chat.completions.create(model="scripted", messages=MSG, tools=TOOLS, tool_choice="none", max_tokens=60)
    assert r.choices[0].message.content == server["holder"]["text"] and not r.choices[0].message.tool_calls


def test_auto_parses_the_models_own_format(client, server):
    server["holder"]["text"] = ('Let me see.\n<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris", '
                                '"unit": "celsius"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]</tool_call>')
    r = client.chat.completions.create(model="scripted", messages=MSG, tools=TOOLS, max_tokens=100)
    assert r.choices[0].message.content == "Let me see."
    assert r.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("add", {"a": 1, "b": 2})]


def test_required_wins_over_response_format(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    r = client.chat.completions.create(model="mm3", messages=MSG, tools=TOOLS, tool_choice="required",
                                       response_format=fmt, max_tokens=300, temperature=1.0, seed=1)
    checked_calls(r.choices[0])


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/missing"}}}}}], "tool_choice": "required"},
     "tools[1].function.parameters"),
], ids=["required-without-tools", "unknown-named-tool", "bad-schema-auto", "bad-schema-required"])
def test_bad_tool_requests_are_400(server, body, param):
    r = httpx.post(server["url"] + "/v1/chat/completions", timeout=60,
                   json={"model": "mm3", "messages": MSG, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_langchain_bind_tools_round_trip(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from pydantic import BaseModel, Field

    class City(BaseModel):  # bounded: greedy decoding of a random model would not end a free string
        city: str = Field(max_length=12)

    @tool(args_schema=City)
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    llm = langchain_openai.ChatOpenAI(model="mm3", base_url=server["url"] + "/v1", api_key="unused", max_tokens=200,
                                      temperature=0, max_retries=0)
    messages = [HumanMessage("What is the weather in Paris?")]
    # greedy on a random model would repeat calls until max_tokens: one call, as parallel_tool_calls=False asks
    reply = llm.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False).invoke(messages)
    assert [c["name"] for c in reply.tool_calls] and {c["name"] for c in reply.tool_calls} == {"get_weather"}
    messages.append(reply)
    for call in reply.tool_calls:
        assert isinstance(call["args"]["city"], str)
        messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    final = llm.bind(max_tokens=8).invoke(messages)
    assert isinstance(final.content, str) and final.content and not final.tool_calls
    assert final.response_metadata["finish_reason"] in ("stop", "length")


@pytest.mark.slow
def test_default_model_calls_the_weather_tool():
    """The real default model (SmolLM2-135M-Instruct) sees the tools in its authors' format. With tool_choice auto
    it answers in prose at this size (its authors' own prompt text does no better); greedy with required, the
    call it writes names the tool and the city asked about."""
    from minimind.engine import LLM
    from minimind.serve import create_app

    weather = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                                "parameters": {"type": "object", "properties": {"city": {
                                                    "type": "string", "description": "the city name"}},
                                                               "required": ["city"]}}}
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    with serve(create_app(LLM(None, max_num_seqs=1, max_model_len=2048), served_model_name="smol")) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        auto = c.chat.completions.create(model="smol", messages=question, tools=[weather], temperature=0,
                                         max_tokens=60)
        plain = c.chat.completions.create(model="smol", messages=question, tool_choice="none", tools=[weather],
                                          temperature=0, max_tokens=1)
        assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tool list is in the prompt
        for call in auto.choices[0].message.tool_calls or []:  # when it does call, the call parses
            assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
        r = c.chat.completions.create(model="smol", messages=question, tools=[weather], tool_choice="required",
                                      temperature=0, max_tokens=60)
        assert [(t.function.name, json.loads(t.function.arguments)) for t in r.choices[0].message.tool_calls] == [
            ("get_weather", {"city": "Paris"})]
        assert r.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("tokenizer_name", ["minimind-3", "minimind2"])  # tags as tokens / as text
def test_tool_grammar_accepts_exactly_the_calls(tokenizer_name):
    """The grammar against hand-written replies: what it must accept and what it must refuse."""
    import llguidance
    import llguidance.hf
    from transformers import AutoTokenizer

    from minimind.serve.guided import tool_grammar, tool_schema

    t = AutoTokenizer.from_pretrained(str(tokenizer_dir(tokenizer_name)))
    lltok = llguidance.hf.from_tokenizer(t)
    tools = [(name, tool_schema(schema)) for name, schema in SCHEMAS.items()] + [("ping", tool_schema(None))]

    def accepts(text: str, fmt="object", **kw) -> bool:
        grammar = llguidance.LLMatcher.grammar_from_lark(tool_grammar(tools, fmt, set(t.get_added_vocab()), **kw))
        m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        return m.consume_tokens(t.encode(text, add_special_tokens=False)) and m.is_accepting()

    add = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    ping = '{"name": "ping", "arguments": {}}'
    one, two = f"<tool_call>\n{add}\n</tool_call>", f"<tool_call>\n{add}\n</tool_call>\n<tool_call>\n{ping}\n</tool_call>"
    assert accepts(one) and accepts(two) and accepts(one, parallel=False) and not accepts(two, parallel=False)
    assert accepts(f"<tool_call>[{add}, {ping}]</tool_call>", "list")
    assert not accepts(f"<tool_call>[{add}, {ping}]</tool_call>", "list", parallel=False)
    assert accepts("let me think\n</think>\n\n" + one, in_think=True) and not accepts(one, in_think=True)
    for bad in ['{"name": "add", "arguments": {"a": 1}}',  # a required argument missing
                '{"name": "add", "arguments": {"a": 100, "b": 2}}',  # out of the schema's range
                '{"name": "add", "arguments": {"a":1,"b":2}}',  # not the layout the templates write
                '{"name": "ping", "arguments": {"x": 1}}',  # no parameters: no arguments
                '{"name": "other", "arguments": {}}']:  # not a tool
        assert not accepts(f"<tool_call>\n{bad}\n</tool_call>"), bad
    assert not accepts("plain text") and not accepts("")
