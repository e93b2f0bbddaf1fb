"""The Ollama API of `minimind serve` against the official `ollama` client: a real server on 127.0.0.1 (uvicorn and
hypercorn) serving a tiny random model with the real minimind-3 tokenizer ("tiny"), one that replays a fixed reply
("scripted": tool calls and thinking, which a random model never writes) and one with the minimind2 tokenizer,
whose template has no thinking ("plain"). Greedy replies are compared with the OpenAI routes and with the model's
own tokens."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import httpx
import pytest

from conftest import ASGI_SERVERS, serve, tiny_config, tiny_model, tokenizer_dir
from test_serve import script

ollama = pytest.importorskip("ollama")
pytest.importorskip("fastapi")
pytest.importorskip("hypercorn")

MSG = [{"role": "user", "content": "你好"}]
GREEDY = {"temperature": 0, "num_predict": 12}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
          "required": ["name", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind-3")))


@pytest.fixture(scope="module", params=ASGI_SERVERS)
def server(tokenizer, request):
    from transformers import AutoTokenizer

    from minimind.engine import LLM
    from minimind.serve import create_app

    llm = LLM(tiny_model("minimind3", vocab_size=6400), tokenizer=tokenizer, max_num_seqs=4, max_model_len=512)
    scripted = LLM(tiny_model("minimind3", vocab_size=6400, seed=1), tokenizer=tokenizer, max_num_seqs=2,
                   max_model_len=512)
    holder = {"text": "hello"}
    script(scripted, tokenizer, holder)
    plain_tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))
    plain = LLM(tiny_model("minimind2", vocab_size=6400), tokenizer=plain_tok, max_num_seqs=2, max_model_len=256)
    app = create_app({"tiny": llm, "scripted": scripted, "plain": plain})
    with serve(app, server=request.param) as url:
        yield {"url": url, "holder": holder}


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server["url"], timeout=60)


def openai_chat(url: str, messages: list, **fields) -> dict:
    body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 12, **fields}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()


def test_chat_whole_and_streamed_equal_chat_completions(client, server):
    whole = client.chat(model="tiny", messages=MSG, options=GREEDY)
    parts = list(client.chat(model="tiny", messages=MSG, options=GREEDY, stream=True))
    reference = openai_chat(server["url"], MSG)
    text = reference["choices"][0]["message"]["content"]
    assert whole.message.role == "assistant" and whole.message.content == text
    assert "".join(p.message.content or "" for p in parts) == text
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True] and parts[-1].message.content == ""
    for final in (whole, parts[-1]):
        assert final.done_reason == reference["choices"][0]["finish_reason"]
        assert final.prompt_eval_count == reference["usage"]["prompt_tokens"]
        assert final.eval_count == reference["usage"]["completion_tokens"]
        assert final.total_duration >= final.eval_duration > 0 and final.prompt_eval_duration > 0
    assert whole.model == "tiny" and whole.created_at.endswith("Z")


def test_ndjson_framing(server):
    body = {"model": "tiny:latest", "messages": MSG, "options": {"num_predict": 4}}  # streams by default
    with httpx.stream("POST", server["url"] + "/api/chat", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert all(line["model"] == "tiny:latest" for line in lines) and lines[-1]["done"] is True
    assert {"total_duration", "load_duration", "prompt_eval_count", "eval_count", "eval_duration"} <= set(lines[-1])
    assert lines[-1]["eval_count"] == 4 and lines[-1]["done_reason"] == "length"
    assert all(isinstance(lines[-1][k], int) for k in lines[-1] if k.endswith("duration"))


def test_generate_context_round_trip(client, server, tokenizer):
    from minimind.text.template import render_prompt

    first = client.generate(model="tiny", prompt="你好", options=GREEDY)
    parts = list(client.generate(model="tiny", prompt="你好", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == first.response and parts[-1].context == first.context
    prompt_ids = tokenizer.encode(render_prompt(tokenizer, MSG, open_thinking=None), add_special_tokens=False)
    assert first.context[:len(prompt_ids)] == prompt_ids and len(first.context) == len(prompt_ids) + first.eval_count
    assert tokenizer.decode(first.context[len(prompt_ids):], skip_special_tokens=True) == first.response
    assert first.response == client.chat(model="tiny", messages=MSG, options=GREEDY).message.content

    turn = [{"role": "user", "content": "再见"}]
    second = client.generate(model="tiny", prompt="再见", context=first.context, options=GREEDY)
    turn_ids = tokenizer.encode(render_prompt(tokenizer, turn, open_thinking=None), add_special_tokens=False)
    assert second.context[:len(first.context) + len(turn_ids)] == first.context + turn_ids
    reference = httpx.post(server["url"] + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": first.context + turn_ids, "temperature": 0, "max_tokens": 12}).json()
    assert second.response == reference["choices"][0]["text"]


def test_generate_raw_is_the_prompt_alone(client, server):
    raw = client.generate(model="tiny", prompt="Once upon", raw=True, options=GREEDY)
    reference = httpx.post(server["url"] + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "Once upon", "temperature": 0, "max_tokens": 12}).json()
    assert raw.response == reference["choices"][0]["text"] and raw.context is None
    assert raw.prompt_eval_count == reference["usage"]["prompt_tokens"]


def test_empty_request_loads(client):
    assert client.generate(model="tiny").done_reason == "load"
    r = httpx.post(client._client.base_url.join("/api/chat"), json={"model": "tiny", "keep_alive": 0}).json()
    assert r["done"] is True and r["done_reason"] == "unload" and r["message"]["role"] == "assistant"


def test_options_map_to_sampling(client):
    short = client.chat(model="tiny", messages=MSG, options={"num_predict": 3, "temperature": 0, "mirostat": 2})
    assert short.eval_count == 3 and short.done_reason == "length"  # unknown options are ignored, as Ollama does
    seeded = [client.chat(model="tiny", messages=MSG, options={"seed": 7, "temperature": 1.0, "top_k": 20,
                                                                "top_p": 0.9, "min_p": 0.01, "repeat_penalty": 1.1,
                                                                "num_predict": 8}).message.content for _ in range(2)]
    assert seeded[0] == seeded[1]
    stopped = client.chat(model="tiny", messages=MSG, options={**GREEDY, "num_predict": 40})
    word = stopped.message.content[3:5]
    if word.strip():  # the reply cut before its first occurrence of a stop string
        cut = client.chat(model="tiny", messages=MSG, options={**GREEDY, "num_predict": 40, "stop": [word]})
        assert cut.message.content == stopped.message.content[:stopped.message.content.index(word)]
    big = client.chat(model="tiny", messages=MSG, options={**GREEDY, "num_ctx": 1 << 20})  # clamped to 512
    assert big.message.content == client.chat(model="tiny", messages=MSG, options=GREEDY).message.content
    capped = client.chat(model="tiny", messages=MSG, options={"num_ctx": short.prompt_eval_count + 2})
    assert capped.eval_count <= 2
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="tiny", messages=MSG, options={"num_ctx": 4})
    assert err.value.status_code == 400 and "num_ctx" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="tiny", messages=MSG, options={"temperature": -1})
    assert err.value.status_code == 400 and "options.temperature" in err.value.error


def test_format_json_and_schema(client):
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    for seed in (1, 2):
        r = client.chat(model="tiny", messages=MSG, format=SCHEMA, options={"seed": seed, "num_predict": 80})
        assert r.done_reason == "stop", r.message.content
        jsonschema.validate(json.loads(r.message.content), SCHEMA)
    r = client.generate(model="tiny", prompt="你好", format="json", options={"temperature": 0, "num_predict": 60})
    assert r.response.startswith("{") and (r.done_reason == "length" or isinstance(json.loads(r.response), dict))


def test_thinking_and_tool_calls(client, server):
    holder = server["holder"]
    holder["text"] = "<think>\nweigh it\n</think>\n\nParis"
    r = client.chat(model="scripted", messages=MSG, think=True)
    assert r.message.thinking == "weigh it" and r.message.content == "Paris"
    parts = list(client.chat(model="scripted", messages=MSG, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == "weigh it"
    assert "".join(p.message.content or "" for p in parts) == "Paris"
    g = client.generate(model="scripted", prompt="你好")
    assert g.thinking == "weigh it" and g.response == "Paris"

    holder["text"] = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    r = client.chat(model="scripted", messages=MSG, tools=tools)
    [call] = r.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    assert r.done_reason == "stop" and r.message.content == ""
    streamed = [c for p in client.chat(model="scripted", messages=MSG, tools=tools, stream=True)
                for c in (p.message.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [("get_weather", {"city": "Paris"})]
    holder["text"] = "It is sunny."
    history = [*MSG, {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_name": "get_weather", "content": '{"weather": "sunny"}'}]
    assert client.chat(model="scripted", messages=history, tools=tools).message.content == "It is sunny."
    # a random model given tools: whatever it writes comes back in Ollama's shape
    r = client.chat(model="tiny", messages=MSG, tools=tools, options=GREEDY)
    assert all(isinstance(c.function.arguments, dict) for c in r.message.tool_calls or [])


def test_names_and_errors(client, server):
    for name in ("tiny", "tiny:latest", "TINY:Latest"):
        assert client.chat(model=name, messages=MSG, options={"num_predict": 1}).done
    for call in (lambda: client.chat(model="nope", messages=MSG), lambda: client.generate(model="nope:7b", prompt="x"),
                 lambda: client.show("nope"), lambda: client.embed(model="nope", input="x")):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 404 and err.value.error.startswith("model 'nope")
    bad = [{"model": "tiny", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
           {"model": "tiny", "prompt": "x", "suffix": "y"}, {"model": "tiny", "prompt": "x", "template": "{{ .Prompt }}"},
           {"model": "tiny", "prompt": "x", "images": ["aGk="]}, {"model": "tiny", "prompt": "x", "raw": True,
                                                                  "system": "s"},
           {"model": "plain", "messages": MSG, "think": True}, {"model": "tiny", "messages": "x"}]
    for body in bad:
        path = "/api/chat" if "messages" in body else "/api/generate"
        r = httpx.post(server["url"] + path, json={**body, "stream": False}, timeout=30)
        assert r.status_code == 400 and set(r.json()) == {"error"} and r.json()["error"], (body, r.text)
    assert "does not support thinking" in httpx.post(server["url"] + "/api/chat", json=bad[-2]).json()["error"]
    for call in (lambda: client.pull("tiny"), lambda: client.delete("tiny"), lambda: client.copy("tiny", "t2"),
                 lambda: client.create("t2", from_="tiny")):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 400 and "does not manage models" in err.value.error


def test_list_show_ps_version(client, tokenizer):
    from minimind.serve.ollama_catalog import parameter_count

    listed = client.list().models
    assert [m.model for m in listed] == ["tiny:latest", "scripted:latest", "plain:latest"]
    assert listed[0].details.family == "minimind3" and listed[0].details.quantization_level == "F32"
    n = sum(p.numel() for p in tiny_model("minimind3", vocab_size=6400).parameters())
    assert parameter_count(tiny_config("minimind3", vocab_size=6400)) == n
    show = client.show("tiny")
    assert show.modelinfo["general.parameter_count"] == n and show.modelinfo["general.architecture"] == "minimind3"
    assert show.modelinfo["minimind3.context_length"] == 512 and show.template == tokenizer.chat_template
    assert set(show.capabilities) == {"completion", "tools", "thinking"}
    assert client.show("plain").capabilities == ["completion", "tools"]  # tools go into its system turn
    running = {m.model: m for m in client.ps().models}
    assert running["tiny:latest"].context_length == 512 and running["plain:latest"].context_length == 256
    assert isinstance(httpx.get(client._client.base_url.join("/api/version")).json()["version"], str)


@pytest.mark.parametrize("era", [("minimind2", False), ("minimind2", True), ("minimind3", True)])
def test_parameter_count_matches_the_module(era):
    from minimind.serve.ollama_catalog import parameter_count

    for tied in (True, False):
        model = tiny_model(*era, tie_word_embeddings=tied)
        unique = {id(p): p for p in model.parameters()}.values()
        assert parameter_count(model.config) == sum(p.numel() for p in unique)


def test_open_webui_connection(server):
    """What Open WebUI asks an Ollama connection before it lists models: GET /api/version and GET /api/tags (and
    clients probe GET / for "Ollama is running")."""
    url = server["url"]
    assert httpx.get(url + "/").text == "Ollama is running" and httpx.head(url + "/").status_code == 200
    version = httpx.get(url + "/api/version").json()
    assert list(version) == ["version"] and all(p.isdigit() for p in version["version"].split("."))
    for m in httpx.get(url + "/api/tags").json()["models"]:
        assert m["name"] == m["model"] and m["name"].endswith(":latest") and len(m["digest"]) == 64
        assert isinstance(m["size"], int) and m["modified_at"].endswith("Z")
        assert {"format", "family", "families", "parameter_size", "quantization_level"} <= set(m["details"])
    for m in httpx.get(url + "/api/ps").json()["models"]:  # Open WebUI reads expires_at with fromisoformat
        assert datetime.fromisoformat(m["expires_at"]) > datetime.now(timezone.utc)


def test_embed(client, server, tokenizer):
    import torch

    texts = ["你好", "the weather in Paris"]
    r = client.embed(model="tiny", input=texts)
    reference = httpx.post(server["url"] + "/v1/embeddings", json={"model": "tiny", "input": texts}, timeout=60).json()
    for got, want in zip(r.embeddings, reference["data"], strict=True):  # batched with others: float noise
        assert got == pytest.approx(want["embedding"], abs=1e-6)
    assert r.prompt_eval_count == reference["usage"]["prompt_tokens"]
    model = tiny_model("minimind3", vocab_size=6400)  # the served weights: mean of the last hidden states, unit length
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([tokenizer.encode(texts[1], add_special_tokens=False)]))
    hidden = getattr(hidden, "last_hidden_state", hidden)[0].mean(0)
    assert torch.allclose(torch.tensor(r.embeddings[1]), hidden / hidden.norm(), atol=1e-4)
    assert client.embeddings(model="tiny:latest", prompt=texts[0]).embedding == pytest.approx(r.embeddings[0], abs=1e-6)
    assert client.embed(model="tiny", input="").embeddings == []
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="tiny", input="x", dimensions=3)
    assert err.value.status_code == 400 and "dimensions" in err.value.error


def test_the_docs_snippet_runs(server, capsys, tmp_path):
    """docs/serving.md's Ollama snippet, against this server (its URL and model id swapped in)."""
    import runpy
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    code = doc.split("## Ollama API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "http://127.0.0.1:8000" in code and '"full_sft"' in code
    snippet = tmp_path / "snippet.py"
    snippet.write_text(code.replace("http://127.0.0.1:8000", server["url"]).replace('"full_sft"', '"tiny"'))
    runpy.run_path(str(snippet))
    assert capsys.readouterr().out.strip()


def test_api_key_in_ollamas_shape(tokenizer):
    """With --api-key: the `/` probe stays open (clients send it before any key), /api/ routes answer 401 in
    Ollama's error shape, and the ollama client authenticates with its `Authorization: Bearer` header."""
    from minimind.engine import LLM
    from minimind.serve import create_app

    llm = LLM(tiny_model("minimind3", vocab_size=6400), tokenizer=tokenizer, max_num_seqs=1, max_model_len=64)
    with serve(create_app(llm, served_model_name="tiny", api_key="k3y")) as url:
        assert httpx.get(url + "/").text == "Ollama is running"
        refused = httpx.get(url + "/api/tags")
        assert refused.status_code == 401 and list(refused.json()) == ["error"] and "API key" in refused.json()["error"]
        with pytest.raises(ollama.ResponseError) as err:
            ollama.Client(host=url).list()
        assert err.value.status_code == 401
        keyed = ollama.Client(host=url, headers={"Authorization": "Bearer k3y"})
        assert [m.model for m in keyed.list().models] == ["tiny:latest"]
