"""The Responses API (/v1/responses) against the official openai client and the openai-agents SDK: a real server on
127.0.0.1 serving a tiny random model with the real minimind-3 tokenizer, plus a scripted one (test_serve.script)
for the replies a random model never writes (tool calls, reasoning). Prompt token counts are checked against the
chat template rendered here, directly."""
from __future__ import annotations

import asyncio
import json
from typing import Literal

import pytest

from conftest import serve, tiny_model, tokenizer_dir
from test_serve import SCHEMA, script

openai = pytest.importorskip("openai")

TOOL = {"type": "function", "name": "get_weather", "description": "weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind-3")))


@pytest.fixture(scope="module")
def server(tokenizer):
    from minimind.engine import LLM
    from minimind.serve import create_app

    llm = LLM(tiny_model("minimind3", vocab_size=6400), tokenizer=tokenizer, max_num_seqs=4, max_model_len=512)
    scripted = LLM(tiny_model("minimind3", vocab_size=6400, seed=1), tokenizer=tokenizer, max_num_seqs=2,
                   max_model_len=512)
    holder = {"text": "hello"}
    script(scripted, tokenizer, holder)
    with serve(create_app({"tiny": llm, "scripted": scripted})) as url:
        yield {"url": url, "holder": holder}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def prompt_tokens(tokenizer, messages, tools=None, open_thinking=None) -> int:
    from minimind.text.template import render_prompt

    text = render_prompt(tokenizer, messages, tools=tools, open_thinking=open_thinking)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_create_stream_and_chat_completions_agree(client, tokenizer):
    kwargs = {"model": "tiny", "instructions": "be brief", "input": "你好", "max_output_tokens": 12,
              "temperature": 0}
    whole = client.responses.create(**kwargs)
    assert whole.object == "response" and whole.id.startswith("resp_") and whole.model == "tiny"
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert whole.output_text == chat.choices[0].message.content
    assert whole.usage.input_tokens == prompt_tokens(tokenizer, messages) == chat.usage.prompt_tokens
    assert whole.usage.output_tokens == 12 and whole.usage.total_tokens == whole.usage.input_tokens + 12

    events = list(client.responses.create(**kwargs, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == 12


def test_stream_helper_retrieve_input_items_delete(client, server):
    server["holder"]["text"] = "hello there"
    with client.responses.stream(model="scripted", input="hi", max_output_tokens=20) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas) == "hello there"
    got = client.responses.retrieve(final.id)
    assert got.output_text == "hello there" and got.usage.output_tokens == final.usage.output_tokens
    items = client.responses.input_items.list(final.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "hi")]
    client.responses.delete(final.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(final.id)


def test_input_items_pages_and_the_store_forgets_the_oldest(client):
    from minimind.serve.errors import APIError
    from minimind.serve.responses import ResponseStore

    texts = ["a", "b", "c"]
    r = client.responses.create(model="scripted", max_output_tokens=2, input=[
        {"role": "user", "content": t} for t in texts])
    first = client.responses.input_items.list(r.id, order="asc", limit=2)
    assert [i.content[0].text for i in first.data] == ["a", "b"] and first.has_more
    rest = client.responses.input_items.list(r.id, order="asc", after=first.last_id)
    assert [i.content[0].text for i in rest.data] == ["c"] and not rest.has_more
    assert [i.content[0].text for i in client.responses.input_items.list(r.id).data] == ["c", "b", "a"]

    store = ResponseStore(capacity=2)
    store.put("a", {})
    store.put("b", {})
    store.get("a")
    store.put("c", {})
    assert list(store.records) == ["a", "c"]  # b was the least recently used
    with pytest.raises(APIError):
        store.get("b")


def test_previous_response_id_and_store_false(client, server, tokenizer):
    holder = server["holder"]
    holder["text"] = "first answer"
    first = client.responses.create(model="scripted", instructions="sys", input="one", max_output_tokens=20)
    holder["text"] = "second answer"
    second = client.responses.create(model="scripted", input="two", previous_response_id=first.id,
                                     max_output_tokens=20)
    # instructions are not carried over; the earlier turn's input and output are
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "first answer"},
               {"role": "user", "content": "two"}]
    assert second.usage.input_tokens == prompt_tokens(tokenizer, history)
    counted = client.responses.input_tokens.count(model="scripted", input="two", previous_response_id=first.id)
    assert counted.input_tokens == second.usage.input_tokens
    assert first.usage.input_tokens == prompt_tokens(tokenizer, [{"role": "system", "content": "sys"},
                                                                 {"role": "user", "content": "one"}])
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="scripted", input="x", previous_response_id="resp_unknown")
    assert err.value.body["param"] == "previous_response_id"

    unstored = client.responses.create(model="scripted", input="x", max_output_tokens=5, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_json_schema_format(client):
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    r = client.responses.create(model="tiny", input="你好", max_output_tokens=80, temperature=0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": SCHEMA}})
    assert r.status == "completed", r.output_text
    jsonschema.validate(json.loads(r.output_text), SCHEMA)


def test_tool_call_round_trip_and_stream(client, server, tokenizer):
    holder = server["holder"]
    holder["text"] = CALL
    r = client.responses.create(model="scripted", input="weather?", tools=[TOOL], max_output_tokens=60)
    [call] = r.output
    assert r.status == "completed" and call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id.startswith("call_")

    events = list(client.responses.create(model="scripted", input="weather?", tools=[TOOL], max_output_tokens=60,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[2:6] == ["response.output_item.added", "response.function_call_arguments.delta",
                          "response.function_call_arguments.done", "response.output_item.done"]
    done = events[4]
    assert done.name == "get_weather" and json.loads(done.arguments) == {"city": "Paris"}

    holder["text"] = "It is sunny."
    output = {"type": "function_call_output", "call_id": call.call_id, "output": '{"weather": "sunny"}'}
    answer = client.responses.create(model="scripted", input=[output], previous_response_id=r.id, tools=[TOOL],
                                     max_output_tokens=20)
    assert answer.output_text == "It is sunny." and answer.status == "completed"
    chat_tool = {"type": "function", "function": {k: TOOL[k] for k in ("name", "description", "parameters")}}
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": call.call_id, "type": "function", "function": {
                   "name": "get_weather", "arguments": call.arguments}}]},
               {"role": "tool", "tool_call_id": call.call_id, "content": '{"weather": "sunny"}'}]
    assert answer.usage.input_tokens == prompt_tokens(tokenizer, history, [chat_tool])
    # the same turn sent whole, as a stateless client does (function_call item, then its output)
    items = [{"role": "user", "content": "weather?"}, call.model_dump(exclude_none=True), output]
    again = client.responses.create(model="scripted", input=items, tools=[TOOL], max_output_tokens=20, store=False)
    assert again.usage.input_tokens == answer.usage.input_tokens


def test_tool_choice_holds_a_random_model_to_the_tool(client):
    pytest.importorskip("llguidance")
    tool = {"type": "function", "name": "pick", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
        "additionalProperties": False}}
    for choice in ("required", {"type": "function", "name": "pick"}):
        r = client.responses.create(model="tiny", input="weather?", tools=[tool], tool_choice=choice,
                                    parallel_tool_calls=False, max_output_tokens=60, temperature=0)
        [call] = r.output
        assert r.status == "completed" and call.type == "function_call" and call.name == "pick"
        assert json.loads(call.arguments)["city"] in ("Paris", "Rome")


def test_reasoning_items(client, server, tokenizer):
    text = "<think>\nweigh it\n</think>\n\nParis"
    server["holder"]["text"] = text
    r = client.responses.create(model="scripted", input="capital?", max_output_tokens=40)
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "weigh it"
    assert message.type == "message" and r.output_text == "Paris"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert r.usage.output_tokens_details.reasoning_tokens == ids.index(tokenizer.convert_tokens_to_ids("</think>")) + 1
    events = list(client.responses.create(model="scripted", input="capital?", max_output_tokens=40, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "weigh it"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Paris"
    assert [i.type for i in events[-1].response.output] == ["reasoning", "message"]


def test_reasoning_effort_turns_thinking_on_and_off(client, tokenizer):
    msg = [{"role": "user", "content": "hi"}]
    counts = {effort: client.responses.input_tokens.count(model="tiny", input="hi", reasoning={"effort": effort})
              .input_tokens for effort in ("none", "high")}
    assert counts == {"none": prompt_tokens(tokenizer, msg, open_thinking=False),
                      "high": prompt_tokens(tokenizer, msg, open_thinking=True)}
    assert counts["none"] != counts["high"]


def test_logprobs_when_included(client):
    kwargs = {"model": "tiny", "input": "你好", "max_output_tokens": 6, "temperature": 0, "top_logprobs": 2,
              "include": ["message.output_text.logprobs"]}
    r = client.responses.create(**kwargs)
    part = r.output[0].content[0]
    assert len(part.logprobs) == r.usage.output_tokens == 6
    assert "".join(lp.token for lp in part.logprobs) == part.text
    # greedy: each chosen token is the most likely one
    assert all(len(lp.top_logprobs) == 2 and lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)
               for lp in part.logprobs)
    events = list(client.responses.create(**kwargs, stream=True))
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [lp.token for lp in streamed] == [lp.token for lp in part.logprobs]
    assert [lp.logprob for lp in streamed] == pytest.approx([lp.logprob for lp in part.logprobs], abs=1e-4)
    assert client.responses.create(**{**kwargs, "include": None}).output[0].content[0].logprobs == []


def test_bad_requests_answer_in_openai_shape(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="tiny", input="x", temperature=3)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="tiny", input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "http://x/y.png"}]}])
    assert err.value.body["code"] == "unsupported_content" and err.value.body["param"] == "input[0].content[0]"


@pytest.mark.parametrize("model", ["scripted", "tiny"])
def test_openai_agents_runs_a_function_tool(server, model):
    """openai-agents' default model class (Responses API) runs an agent with one tool: the scripted model writes
    the call; the random one is held to it by tool_choice required (a grammar of the tool's schema)."""
    agents = pytest.importorskip("agents")
    pytest.importorskip("llguidance")
    agents.set_tracing_disabled(True)
    server["holder"]["text"] = CALL
    seen = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather of a city."""
        seen.append(city)
        return f"sunny in {city}"

    client = openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)
    settings = agents.ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=60, temperature=0)
    agent = agents.Agent(name="weather", instructions="answer with the weather", tools=[get_weather],
                         model=agents.OpenAIResponsesModel(model=model, openai_client=client), model_settings=settings,
                         tool_use_behavior="stop_on_first_tool")
    result = asyncio.run(agents.Runner.run(agent, "weather in Paris?"))
    assert len(seen) == 1 and result.final_output == f"sunny in {seen[0]}"
    assert model == "tiny" or seen == ["Paris"]
