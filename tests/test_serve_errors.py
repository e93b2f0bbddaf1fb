"""Every error case of `minimind serve` answers with the OpenAI envelope {"error": {message, type, param, code}}
and the right status, checked with both raw HTTP and the official openai client, under each ASGI server; the
middlewares (API key, metrics, any the app adds) see every response, streamed ones included."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from conftest import ASGI_SERVERS, serve, tiny_model, tokenizer_dir
from test_serve import MSG, wait_idle

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))


def make_app(tokenizer, **kwargs):
    from minimind.engine import LLM
    from minimind.serve import create_app

    seqs = kwargs.pop("max_num_seqs", 2)
    llm = LLM(tiny_model(vocab_size=6400), tokenizer=tokenizer, max_num_seqs=seqs, max_model_len=128)
    return create_app(llm, served_model_name="tiny", **kwargs), llm


@pytest.fixture(scope="module", params=ASGI_SERVERS)
def asgi(request):
    return request.param


@pytest.fixture(scope="module")
def url(tokenizer, asgi):
    app, _ = make_app(tokenizer)
    with serve(app, server=asgi) as base:
        yield base


def envelope(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def post(url, body, path="/v1/chat/completions", **kw):
    return httpx.post(url + path, json=body, timeout=60, **kw)


def test_invalid_json_and_schema(url):
    r = httpx.post(url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [', timeout=30,
                   headers={"content-type": "application/json"})
    assert "JSON" in envelope(r, 400)["message"]
    err = envelope(post(url, {"model": "tiny"}), 400)
    assert err["param"] == "messages" and err["type"] == "invalid_request_error"
    err = envelope(post(url, {"messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert err["param"] == "messages[0].role"
    assert envelope(post(url, {"messages": MSG, "max_tokens": "many"}), 400)["param"] == "max_tokens"
    assert envelope(post(url, {"messages": MSG, "stream_options": {"include_usage": True}}), 400)["param"] \
        == "stream_options"
    assert envelope(post(url, {"messages": MSG, "logit_bias": {"abc": 1}}), 400)["param"] == "logit_bias"


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("n", 0),
                                         ("max_tokens", 0), ("top_logprobs", 50), ("presence_penalty", 3)])
def test_bad_sampling_values(url, field, value):
    err = envelope(post(url, {"messages": MSG, field: value, "logprobs": True}), 400)
    assert err["param"] == field


def test_unknown_model_lists_served_ids(url):
    err = envelope(post(url, {"model": "gpt-4", "messages": MSG}), 404)
    assert "`gpt-4`" in err["message"] and "`tiny`" in err["message"] and err["param"] == "model"
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


def test_context_overflow_vllm_wording(url):
    err = envelope(post(url, {"messages": MSG, "max_tokens": 500}), 400)
    assert err["code"] == "context_length_exceeded"
    assert err["message"].startswith("This model's maximum context length is 128 tokens. However, you requested ")
    assert "500 in the completion" in err["message"]
    long_prompt = "你好" * 400
    err = envelope(post(url, {"prompt": long_prompt}, "/v1/completions"), 400)
    assert "maximum context length is 128 tokens" in err["message"] and "input tokens" in err["message"]


def test_api_key(tokenizer, asgi):
    app, _ = make_app(tokenizer, api_key="sekret")
    with serve(app, server=asgi) as base:
        assert envelope(post(base, {"messages": MSG}), 401)["type"] == "authentication_error"
        assert envelope(post(base, {"messages": MSG}, headers={"Authorization": "Bearer wrong"}), 401)
        ok = post(base, {"messages": MSG, "max_tokens": 2}, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert httpx.get(base + "/health").status_code == 200  # probes need no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
        assert openai.OpenAI(base_url=base + "/v1", api_key="sekret").models.list().data[0].id == "tiny"


def test_queue_full_429_with_retry_after(tokenizer, asgi):
    app, llm = make_app(tokenizer, max_num_seqs=1, max_queue=0)
    engine = app.state.ctx.engines["tiny"]
    original = llm.runner.sample

    def slow(logits, seqs):  # a tiny model finishes 100 tokens before the second request arrives otherwise
        time.sleep(0.02)
        return original(logits, seqs)

    llm.runner.sample = slow
    llm.runner.fused = None  # its multi-token decode call samples in C, past this sampler
    with serve(app, server=asgi) as base:
        body = {"messages": MSG, "max_tokens": 100, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the response (= disconnect)
            next(lines)
            busy = post(base, {"messages": MSG, "max_tokens": 2})
            assert envelope(busy, 429)["code"] == "queue_full" and busy.headers["retry-after"] == "1"
        wait_idle(engine)
        assert post(base, {"messages": MSG, "max_tokens": 2}).status_code == 200


def test_engine_failure_mid_stream_is_an_error_event(tokenizer, asgi):
    app, llm = make_app(tokenizer)
    original = llm.runner.sample
    state = {"calls": 0}

    def flaky(logits, seqs):
        state["calls"] += 1
        if state["calls"] == 3:
            raise RuntimeError("boom")
        return original(logits, seqs)

    llm.runner.sample = flaky
    llm.runner.fused = None  # its multi-token decode call samples in C, past this sampler
    with serve(app, server=asgi) as base:
        body = {"messages": MSG, "max_tokens": 10, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
            events = [line[6:] for line in r.iter_lines() if line]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "boom" in error["message"] and error["type"] == "internal_server_error"
        wait_idle(app.state.ctx.engines["tiny"])
        assert post(base, {"messages": MSG, "max_tokens": 2}).status_code == 200  # the server keeps serving


class Recorder:
    """A plain ASGI middleware that keeps every response's status and body as it passes through."""

    def __init__(self, app, seen: list):
        self.app, self.seen = app, seen

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = {"path": scope["path"], "status": None, "body": b""}
        self.seen.append(record)

        async def recording(message):
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
            elif message["type"] == "http.response.body":
                record["body"] += message.get("body", b"")
            await send(message)

        await self.app(scope, receive, recording)


def test_middlewares_see_streamed_responses(tokenizer, asgi):
    """Every byte of a streamed response passes through the app's middlewares (a recorder and CORS added to the
    app, the API key check and the request counter of create_app), like any other response's."""
    from starlette.middleware.cors import CORSMiddleware

    seen = []
    app, _ = make_app(tokenizer, api_key="sekret")
    app.add_middleware(Recorder, seen=seen)
    app.add_middleware(CORSMiddleware, allow_origins=["http://example.test"])
    key = {"Authorization": "Bearer sekret", "Origin": "http://example.test"}
    with serve(app, server=asgi) as base:
        for path, body in (("/v1/chat/completions", {"messages": MSG}), ("/v1/completions", {"prompt": "x"})):
            stream = {**body, "max_tokens": 12, "stream": True, "ignore_eos": True}
            assert envelope(post(base, stream, path), 401)["type"] == "authentication_error"  # key checked
            r = post(base, stream, path, headers=key)
            assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n") and r.content.count(b"data:") >= 3
            assert r.headers["access-control-allow-origin"] == "http://example.test"
            assert seen[-1] == {"path": path, "status": 200, "body": r.content}
        metrics = httpx.get(base + "/metrics").text
    for route in ("/v1/chat/completions", "/v1/completions"):
        assert f'minimind_http_requests_total{{method="POST",route="{route}",status="200"}} 1.0' in metrics
