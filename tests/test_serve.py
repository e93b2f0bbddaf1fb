"""`minimind serve` against the official openai client: a real server on 127.0.0.1 (random free port; the app
under uvicorn and under hypercorn) serving a tiny random model with the real minimind-3 tokenizer. A second
served id ("scripted") replays a fixed reply, so tool calls and reasoning can be checked although a random model
never writes them."""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
import torch

from conftest import ASGI_SERVERS, serve, tiny_model, tokenizer_dir

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("hypercorn")

MSG = [{"role": "user", "content": "你好"}]


def script(llm, tokenizer, text_holder: dict):
    """Make `llm` emit text_holder["text"] token by token (then eos), whatever the logits say."""
    original = llm.runner.sample

    def sample(logits, seqs):
        tokens, *rest = original(logits, seqs)
        ids = tokenizer.encode(text_holder["text"], add_special_tokens=False) + [tokenizer.eos_token_id]
        forced = [ids[min(len(s.output_token_ids), len(ids) - 1)] for s in seqs]
        return (torch.tensor(forced, dtype=tokens.dtype), *rest)

    llm.runner.sample = sample
    llm.runner.fused = None  # the fused kernel's multi-token decode call picks tokens itself: keep the torch step


def wait_idle(engine, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s["active"] == 0 and s["slots_free"] == s["slots_total"] and not engine.llm.has_unfinished():
            return s
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {engine.stats()}")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind-3")))


@pytest.fixture(scope="module", params=ASGI_SERVERS)
def server(tokenizer, request):
    from minimind.engine import LLM
    from minimind.serve import create_app

    llm = LLM(tiny_model("minimind3", vocab_size=6400), tokenizer=tokenizer, max_num_seqs=4, max_model_len=512)
    scripted = LLM(tiny_model("minimind3", vocab_size=6400, seed=1), tokenizer=tokenizer, max_num_seqs=2,
                   max_model_len=512)
    holder = {"text": "hello"}
    script(scripted, tokenizer, holder)
    app = create_app({"tiny": llm, "scripted": scripted})
    with serve(app, server=request.param) as url:
        yield {"url": url, "app": app, "holder": holder, "engine": app.state.ctx.engines["tiny"]}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_non_stream_usage_and_logprobs(client, tokenizer):
    from minimind.text.template import render_prompt

    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert choice.finish_reason in ("length", "stop") and choice.message.role == "assistant"
    prompt_ids = tokenizer.encode(render_prompt(tokenizer, MSG, open_thinking=None), add_special_tokens=False)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(choice.logprobs.content) <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in choice.logprobs.content)
    # greedy: the chosen token is the most likely one
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in choice.logprobs.content)


def test_chat_stream_matches_non_stream(client):
    kwargs = {"model": "tiny", "messages": MSG, "max_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_framing_and_done(server):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[1][6:])  # no usage unless asked for


@pytest.mark.parametrize("asgi", ASGI_SERVERS)
def test_a_client_that_stops_reading_gets_everything_merged(tokenizer, asgi):
    """A client that reads nothing fills the socket buffers; the engine does not wait for it and finishes the
    request meanwhile, its outputs merged in the request's collector. Once the client reads, every choice streamed
    equals the same request not streamed, in fewer chunks than tokens."""
    from minimind.engine import LLM
    from minimind.serve import create_app

    body = {"model": "tiny", "messages": MSG, "max_tokens": 64, "temperature": 0, "ignore_eos": True, "n": 4,
            "logprobs": True, "top_logprobs": 20}  # ~1 KB per token and choice: far more than the buffers hold
    llm = LLM(tiny_model("minimind3", vocab_size=6400), tokenizer=tokenizer, max_num_seqs=4, max_model_len=256)
    app = create_app({"tiny": llm})
    engine = app.state.ctx.engines["tiny"]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # inherited by its connections: a small kernel
    listener.bind(("127.0.0.1", 0))  # buffer, else the kernel would take megabytes before the server has to wait
    with serve(app, listener, asgi) as url, socket.socket() as sock:  # the server closes listener
        whole = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
        payload = json.dumps({**body, "stream": True}).encode()
        host, port = url.removeprefix("http://").split(":")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
        time.sleep(0.2)  # the request is in
        wait_idle(engine, 60)  # finished while the client read nothing
        sock.settimeout(60)
        raw = b"".join(iter(lambda: sock.recv(65536), b""))
    head, chunked = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    data, pos = [], 0
    while (size := int(chunked[pos:chunked.index(b"\r\n", pos)], 16)) > 0:
        start = chunked.index(b"\r\n", pos) + 2
        data.append(chunked[start:start + size])
        pos = start + size + 2
    events = [e[6:] for e in b"".join(data).split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    content, tokens, finish, chunks = {}, {}, {}, {}
    for e in map(json.loads, events[:-1]):
        for c in e["choices"]:
            i = c["index"]
            content[i] = content.get(i, "") + (c["delta"].get("content") or "")
            tokens[i] = tokens.get(i, 0) + len((c.get("logprobs") or {}).get("content") or [])
            finish[i] = c["finish_reason"] or finish.get(i)
            chunks[i] = chunks.get(i, 0) + 1
    for c in whole["choices"]:
        i = c["index"]
        assert content[i] == c["message"]["content"] and finish[i] == c["finish_reason"] == "length"
        assert tokens[i] == len(c["logprobs"]["content"]) == 64
        assert chunks[i] < 64, "the outputs the client did not read were not merged"


def test_completions_n_echo_and_stream(client):
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=6, n=2, seed=3, temperature=1.0,
                                  logprobs=2, echo=True)
    assert [c.index for c in r.choices] == [0, 1] and all(c.text.startswith("hello") for c in r.choices)
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) - r.usage.prompt_tokens for c in r.choices)
    parts = {0: "", 1: ""}
    for chunk in client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=5, temperature=0, stream=True):
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
    whole = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=5, temperature=0)
    assert [parts[i] for i in range(2)] == [c.text for c in whole.choices]
    one = list(client.completions.create(model="tiny", prompt="a", max_tokens=5, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.text for chunk in one for c in chunk.choices) == whole.choices[0].text
    assert one[-1].usage.completion_tokens == 5 and one[-2].choices[0].finish_reason == "length"


def test_seed_reproducible_and_n(client):
    kwargs = {"model": "tiny", "messages": MSG, "max_tokens": 10, "temperature": 1.0, "seed": 1234, "n": 3}
    a, b = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.message.content for c in a.choices}) > 1  # n samples, not one copied


def test_stop_string_and_max_completion_tokens(client):
    base = client.completions.create(model="tiny", prompt="x", max_tokens=12, temperature=0).choices[0].text
    stop = base[3:5]
    assert stop and base.find(stop) >= 1
    r = client.completions.create(model="tiny", prompt="x", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == base[:base.find(stop)] and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny", messages=MSG, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_sampling_fields_accepted(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5, temperature=0.7, top_p=0.9,
                                       presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"100": 100},
                                       user="u", extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert r.usage.completion_tokens >= 1
    forced = client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=1.0,
                                       logit_bias={"100": 100}, logprobs=0)
    assert all(t == forced.choices[0].logprobs.tokens[0] for t in forced.choices[0].logprobs.tokens)


def test_reasoning_and_tools_round_trip(client, server):
    holder = server["holder"]
    holder["text"] = "<think>\nweigh it\n</think>\n\nParis"
    r = client.chat.completions.create(model="scripted", messages=MSG, max_tokens=40)
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == "weigh it" and msg.content == "Paris"
    chunks = list(client.chat.completions.create(model="scripted", messages=MSG, max_tokens=40, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "weigh it"
    assert "".join(d.content or "" for d in deltas) == "Paris"

    holder["text"] = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    r = client.chat.completions.create(model="scripted", messages=MSG, tools=tools, max_tokens=60)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id.startswith("call_")
    chunks = list(client.chat.completions.create(model="scripted", messages=MSG, tools=tools, max_tokens=60,
                                                 stream=True))
    streamed = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(t.index, t.function.name) for t in streamed] == [(0, "get_weather")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the tool result goes back in; the template renders it and the model answers
    holder["text"] = "It is sunny."
    history = MSG + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"weather": "sunny"}'}]
    r = client.chat.completions.create(model="scripted", messages=history, tools=tools, max_tokens=20)
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].finish_reason == "stop"


def test_open_thinking_starts_inside_think(client, server):
    server["holder"]["text"] = "mull\n</think>\n\nok"
    r = client.chat.completions.create(model="scripted", messages=MSG, max_tokens=20,
                                       extra_body={"chat_template_kwargs": {"open_thinking": True}})
    assert r.choices[0].message.model_extra["reasoning_content"] == "mull" and r.choices[0].message.content == "ok"


def test_models_health_tokenize_detokenize_chat_metrics(server, tokenizer):
    url = server["url"]
    models = httpx.get(url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny", "scripted"] and models["object"] == "list"
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    tok = httpx.post(url + "/tokenize", json={"prompt": "你好 world"}).json()
    assert tok["tokens"] == tokenizer.encode("你好 world", add_special_tokens=False) and tok["count"] == len(tok["tokens"])
    assert httpx.post(url + "/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "你好 world"}
    seed_chat = httpx.post(url + "/chat", json={"messages": MSG, "max_tokens": 5, "temperature": 0}, timeout=60)
    assert seed_chat.status_code == 200 and isinstance(seed_chat.json()["response"], str)
    text = httpx.get(url + "/metrics").text
    for name in ("minimind_time_to_first_token_seconds_bucket", "minimind_e2e_request_latency_seconds_count",
                 "minimind_generation_tokens_total", "minimind_num_requests_waiting", "minimind_kv_cache_usage_perc",
                 "minimind_http_requests_total"):
        assert name in text
    assert httpx.get(url + "/docs").status_code == 200


@pytest.mark.parametrize("route,prompt,stream", [("chat", None, True), ("completions", "x", True),
                                                 ("completions", ["x", "y"], True), ("chat", None, False)],
                         ids=["chat", "completion", "two-prompt completion", "chat not streamed"])
def test_client_disconnect_aborts_the_requests(server, monkeypatch, route, prompt, stream):
    """A client that leaves mid-answer: its requests end as aborted (not by running out of tokens) and free their
    KV slots. Streamed: the response's body stops; not streamed: a watcher of the connection notices."""
    import time as clock

    engine = server["engine"]
    sample = engine.llm.runner.sample

    def slow(logits, seqs):  # 400 tokens then take seconds: the requests cannot finish by themselves meanwhile
        clock.sleep(0.005)
        return sample(logits, seqs)

    monkeypatch.setattr(engine.llm.runner, "sample", slow)
    monkeypatch.setattr(engine.llm.runner, "fused", None)  # multi-token C calls would sample without `slow`
    ended = {}

    def hook(outs):
        ended.update((o.request_id, o.outputs[0].finish_reason) for o in outs if o.finished)

    engine.step_hooks.append(hook)
    body = {"model": "tiny", "max_tokens": 400, "stream": stream, "ignore_eos": True,
            **({"messages": MSG} if route == "chat" else {"prompt": prompt})}
    url = f"{server['url']}/v1/{'chat/' if route == 'chat' else ''}completions"
    try:
        if stream:
            with httpx.stream("POST", url, json=body, timeout=60) as r:
                lines = r.iter_lines()
                for _ in range(4):
                    next(lines)
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and closes the connection
                httpx.post(url, json=body, timeout=httpx.Timeout(60, read=0.3))
        s = wait_idle(engine)
    finally:
        engine.step_hooks.remove(hook)
    assert s["running"] == 0
    assert sorted(ended.values()) == ["abort"] * (len(prompt) if isinstance(prompt, list) else 1)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "ok", "n"], "additionalProperties": False}


def test_response_format_json_schema(client):
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=80, temperature=1.0, seed=seed,
                                           response_format=fmt)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    chunks = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=80, temperature=0, stream=True,
                                            response_format=fmt)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), SCHEMA)
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))


def test_response_format_bad_schema(server):
    pytest.importorskip("llguidance")
    r = httpx.post(server["url"] + "/v1/chat/completions", timeout=30, json={
        "messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("response_format")


def test_lora_adapters_are_model_ids_sharing_one_engine(tokenizer):
    """Two adapters and the base model over HTTP at once: /v1/models lists all three, concurrent requests share
    one engine, and each answer equals the text of that adapter's LoRALinear forward greedy tokens."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    from minimind.checkpoint.lora import apply_lora, load_lora, lora_layers
    from minimind.engine import LLM
    from minimind.serve import create_app

    base = tiny_model("minimind3", vocab_size=6400)
    adapters = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        shadow = apply_lora(copy.deepcopy(base), 4)
        gen = torch.Generator().manual_seed(seed)
        adapters[name] = {f"{n}.lora.{ab}.weight": 0.3 * torch.randn(getattr(m.lora, ab).weight.shape, generator=gen)
                          for n, m in lora_layers(shadow).items() for ab in ("A", "B")}
    refs = {"tiny": base, **{n: load_lora(copy.deepcopy(base), sd).eval() for n, sd in adapters.items()}}
    llm = LLM(base, tokenizer=tokenizer, max_num_seqs=4, max_model_len=128, lora_adapters=adapters)
    prompt = [5, 6, 7, 8]

    def expected(model):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt):]

    with serve(create_app({"tiny": llm})) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "beta"]

        def ask(model_id):
            out = client.completions.create(model=model_id, prompt=prompt, max_tokens=6, temperature=0,
                                            extra_body={"ignore_eos": True})
            return model_id, out.choices[0].text

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(ask, ["alpha", "tiny", "beta", "alpha", "beta", "tiny"]))
        metrics = httpx.get(url + "/metrics").text
    # six requests, each counted once (the adapters run on the base model's engine and count under its id)
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("minimind_request_success_total{"))
    assert counted == 6
    texts = {}
    for model_id, text in results:
        assert text == tokenizer.decode(expected(refs[model_id]), skip_special_tokens=True), model_id
        texts.setdefault(model_id, set()).add(text)
    assert len({t for v in texts.values() for t in v}) == 3  # three different weights, three different answers
