"""The Anthropic Messages API (/v1/messages) against the official anthropic client: a real server on 127.0.0.1 (with
an API key, which the SDK sends as x-api-key) serving a tiny random model with the real minimind-3 tokenizer, plus
a scripted one (test_serve.script) for the replies a random model never writes (tool use, thinking)."""
from __future__ import annotations

import json

import httpx
import pytest

from conftest import serve, tiny_model, tokenizer_dir
from test_serve import script

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

KEY = "test-key"
MSG = [{"role": "user", "content": "你好"}]
TOOL = {"name": "get_weather", "description": "weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def server():
    from transformers import AutoTokenizer

    from minimind.engine import LLM
    from minimind.serve import create_app

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind-3")))
    llm = LLM(tiny_model("minimind3", vocab_size=6400), tokenizer=tokenizer, max_num_seqs=4, max_model_len=512)
    scripted = LLM(tiny_model("minimind3", vocab_size=6400, seed=1), tokenizer=tokenizer, max_num_seqs=2,
                   max_model_len=512)
    holder = {"text": "hello"}
    script(scripted, tokenizer, holder)
    with serve(create_app({"tiny": llm, "scripted": scripted}, api_key=KEY)) as url:
        yield {"url": url, "holder": holder, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server["url"], api_key=KEY, max_retries=0, timeout=60)


def test_create_stream_and_chat_completions_agree(client, server):
    kwargs = {"model": "tiny", "system": "be brief", "messages": MSG, "max_tokens": 12,
              "extra_body": {"temperature": 0}}
    whole = client.messages.create(**kwargs)
    assert whole.type == "message" and whole.role == "assistant" and whole.id.startswith("msg_")
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 12
    [block] = whole.content
    chat = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "be brief"}, *MSG], max_tokens=12, temperature=0)
    assert block.type == "text" and block.text == chat.choices[0].message.content
    assert whole.usage.input_tokens == chat.usage.prompt_tokens

    with client.messages.stream(**kwargs) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content[0].text == block.text and final.stop_reason == "max_tokens"
    assert final.usage.input_tokens == whole.usage.input_tokens and final.usage.output_tokens == 12
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_stop" in kinds

    with httpx.stream("POST", server["url"] + "/v1/messages", timeout=60, json={**kwargs.pop("extra_body"), **kwargs,
                      "stream": True}, headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    datas = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in datas] and names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-2:] == ["message_delta", "message_stop"] and datas[-2]["delta"]["stop_reason"] == "max_tokens"


def test_count_tokens_equals_tokenize(client, server):
    counted = client.messages.count_tokens(model="tiny", system="be brief", messages=MSG)
    r = httpx.post(server["url"] + "/tokenize", headers={"x-api-key": KEY}, timeout=60, json={
        "model": "tiny", "messages": [{"role": "system", "content": "be brief"}, *MSG]})
    assert counted.input_tokens == r.json()["count"] > 0


def test_stop_sequence(client, server):
    server["holder"]["text"] = "hello world"
    m = client.messages.create(model="scripted", messages=MSG, max_tokens=20, stop_sequences=["wor"])
    assert m.content[0].text == "hello " and m.stop_reason == "stop_sequence" and m.stop_sequence == "wor"
    m = client.messages.create(model="scripted", messages=MSG, max_tokens=20)
    assert m.content[0].text == "hello world" and m.stop_reason == "end_turn" and m.stop_sequence is None


def test_tool_use_round_trip(client, server):
    holder = server["holder"]
    holder["text"] = CALL
    m = client.messages.create(model="scripted", messages=MSG, tools=[TOOL], max_tokens=60)
    [use] = m.content
    assert m.stop_reason == "tool_use" and use.type == "tool_use" and use.name == "get_weather"
    assert use.input == {"city": "Paris"} and use.id.startswith("toolu_")
    with client.messages.stream(model="scripted", messages=MSG, tools=[TOOL], max_tokens=60,
                                tool_choice={"type": "any"}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "Paris"}

    holder["text"] = "It is sunny."
    history = [*MSG, {"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    m = client.messages.create(model="scripted", messages=history, tools=[TOOL], max_tokens=20)
    assert m.content[0].text == "It is sunny." and m.stop_reason == "end_turn"
    # the prompt is the chat template's rendering of the same turns in chat-completions form
    from minimind.text.template import render_prompt

    chat = [*MSG, {"role": "assistant", "content": None, "tool_calls": [{"id": use.id, "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
            {"role": "tool", "tool_call_id": use.id, "content": "sunny"}]
    tools = [{"type": "function", "function": {"name": TOOL["name"], "description": TOOL["description"],
                                               "parameters": TOOL["input_schema"]}}]
    tok = server["tokenizer"]
    expected = len(tok.encode(render_prompt(tok, chat, tools=tools, open_thinking=None), add_special_tokens=False))
    assert client.messages.count_tokens(model="scripted", messages=history, tools=[TOOL]).input_tokens == expected
    assert m.usage.input_tokens == expected


def test_tool_choice_holds_a_random_model_to_the_tool(client):
    pytest.importorskip("llguidance")
    tool = {"name": "pick", "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                                             "required": ["city"], "additionalProperties": False}}
    for choice in ({"type": "any", "disable_parallel_tool_use": True},
                   {"type": "tool", "name": "pick", "disable_parallel_tool_use": True}):
        m = client.messages.create(model="tiny", messages=MSG, tools=[tool], tool_choice=choice, max_tokens=60,
                                   extra_body={"temperature": 0})
        [use] = m.content
        assert m.stop_reason == "tool_use" and use.name == "pick" and use.input["city"] in ("Paris", "Rome")


def test_thinking_blocks(client, server):
    server["holder"]["text"] = "<think>\nweigh it\n</think>\n\nParis"
    m = client.messages.create(model="scripted", messages=MSG, max_tokens=40)
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == "weigh it" and m.content[1].text == "Paris"
    with client.messages.stream(model="scripted", messages=MSG, max_tokens=40) as stream:
        thinking = "".join(e.thinking for e in stream if e.type == "thinking")
        final = stream.get_final_message()
    assert thinking == "weigh it" and final.content[1].text == "Paris"


def test_thinking_config_turns_thinking_on_and_off(client, server):
    from minimind.text.template import render_prompt

    tok = server["tokenizer"]
    for kind, on in (("enabled", True), ("disabled", False)):
        thinking = {"type": kind, "budget_tokens": 1024} if on else {"type": kind}
        counted = client.messages.count_tokens(model="tiny", messages=MSG, thinking=thinking).input_tokens
        assert counted == len(tok.encode(render_prompt(tok, MSG, open_thinking=on), add_special_tokens=False))


def test_errors_in_anthropic_shape(client, server):
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="tiny", messages=MSG, max_tokens=8, extra_body={"temperature": 5})
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "invalid_request_error"
    assert "temperature" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="nope", messages=MSG, max_tokens=8)
    assert "`tiny`" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="tiny", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}])
    assert "image" in err.value.body["error"]["message"]
    wrong = anthropic.Anthropic(base_url=server["url"], api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        wrong.messages.create(model="tiny", messages=MSG, max_tokens=8)
    assert err.value.body["error"]["type"] == "authentication_error"
