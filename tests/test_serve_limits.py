"""Per-request limits of `minimind serve` (serve/limits.py ServeLimits), against a real server on 127.0.0.1 under
each ASGI server: a request that could never be served is a 400 naming the limit, never a 429 "retry"; a prompt
too long for the context is refused before it is tokenized; rendering and tokenizing run off the event loop."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from conftest import ASGI_SERVERS, serve, tiny_model, tokenizer_dir
from test_serve import MSG
from test_serve_errors import envelope, post

openai = pytest.importorskip("openai")

MAX_MODEL_LEN, MAX_NUM_SEQS, MAX_QUEUE = 128, 2, 4  # the server holds 6 engine requests at once
BIG = 10 * 2**20  # characters of an oversized prompt


class SpyTokenizer:
    """Records the length of every text the server tokenizes; `gate`, when set, holds an encode of more than
    `gate_chars` characters until it is released (a long tokenization the test controls)."""

    def __init__(self, tokenizer):
        self.encoded: list[int] = []
        self.gate: threading.Event | None = None
        self.gate_chars = 2**20
        self.entered = threading.Event()
        original = tokenizer.encode

        def encode(text, *args, **kwargs):
            self.encoded.append(len(text))
            if self.gate is not None and len(text) > self.gate_chars:
                self.entered.set()
                assert self.gate.wait(60), "the test never released the tokenizer"
                return [0] * (MAX_MODEL_LEN + 1)  # stands for the tokens of a text too long for the context
            return original(text, *args, **kwargs)

        tokenizer.encode = encode


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))


@pytest.fixture(scope="module")
def spy(tokenizer):
    return SpyTokenizer(tokenizer)


def make_app(tokenizer, limits=None):
    from minimind.engine import LLM
    from minimind.serve import create_app

    llm = LLM(tiny_model(vocab_size=6400), tokenizer=tokenizer, max_num_seqs=MAX_NUM_SEQS,
              max_model_len=MAX_MODEL_LEN)
    return create_app(llm, served_model_name="tiny", max_queue=MAX_QUEUE, limits=limits)


@pytest.fixture(scope="module", params=ASGI_SERVERS)
def url(request, tokenizer, spy):
    with serve(make_app(tokenizer), server=request.param) as base:
        yield base


def rss_bytes() -> int:
    """Resident memory of this process (the server runs in it)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("needs /proc (Linux) to read the resident set size")
    kib = next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
    return int(kib) * 1024


def test_oversized_prompts_are_refused_before_tokenizing(url, spy, tokenizer):
    # the default limit: max_model_len x the longest vocabulary entry, computed here from the vocabulary itself
    longest = max(len(token) for token in tokenizer.get_vocab())
    limit = MAX_MODEL_LEN * longest
    text = ("a long prompt " * BIG)[:BIG]
    bodies = [(b"/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": text}]})),
              (b"/v1/completions", json.dumps({"prompt": ["short", text]}))]
    bodies = [(path.decode(), body.encode()) for path, body in bodies]
    del text
    headers = {"content-type": "application/json"}
    before = rss_bytes()
    for i in range(10):
        path, body = bodies[i % 2]
        what = "messages" if "chat" in path else "prompt"
        err = envelope(httpx.post(url + path, content=body, headers=headers, timeout=120))
        assert err["code"] == "context_length_exceeded" and err["param"] == what
        assert f"maximum context length is {MAX_MODEL_LEN} tokens" in err["message"]
        assert f"at most {limit} characters" in err["message"]
    growth = rss_bytes() - before
    assert growth < 300 * 2**20, f"resident memory grew by {growth / 2**20:.0f} MiB over ten oversized prompts"
    assert max(spy.encoded, default=0) <= limit  # none of the long texts reached the tokenizer
    # a prompt just under the limit is tokenized and gets the token-count error, which names max_model_len
    err = envelope(post(url, {"prompt": "x " * (limit // 2 - 1)}, "/v1/completions"))
    assert err["code"] == "context_length_exceeded" and "input tokens" in err["message"]


def test_health_answers_while_a_prompt_is_tokenized(tokenizer, spy):
    """The request's tokenization is held open by the test: /health must answer meanwhile (the event loop is
    free), and the held request still gets its answer once the tokenizer returns."""
    from minimind.serve.limits import ServeLimits

    app = make_app(tokenizer, ServeLimits(max_prompt_chars=10**9))
    spy.gate, spy.entered = threading.Event(), threading.Event()
    result = {}
    try:
        with serve(app) as base:
            body = {"messages": [{"role": "user", "content": "a" * BIG}]}
            worker = threading.Thread(target=lambda: result.update(r=post(base, body)), daemon=True)
            worker.start()
            assert spy.entered.wait(60), "the long prompt never reached the tokenizer"
            assert httpx.get(base + "/health", timeout=10).json() == {"status": "ok"}
            ok = post(base, {"messages": MSG, "max_tokens": 2, "stream": True})  # other requests are served too
            assert ok.status_code == 200 and ok.text.endswith("data: [DONE]\n\n")
            spy.gate.set()
            worker.join(60)
    finally:
        spy.gate.set()
        spy.gate = None
    assert "maximum context length" in envelope(result["r"])["message"]


def test_more_completions_than_the_server_holds(url):
    capacity = MAX_NUM_SEQS + MAX_QUEUE
    err = envelope(post(url, {"prompt": ["x"] * 1000, "max_tokens": 1}, "/v1/completions"))
    assert err["param"] == "prompt" and f"at most {capacity}" in err["message"] and "1000" in err["message"]
    err = envelope(post(url, {"prompt": [[5, 6]] * 1000, "max_tokens": 1}, "/v1/completions"))
    assert err["param"] == "prompt"
    err = envelope(post(url, {"messages": MSG, "n": capacity + 1, "max_tokens": 1}))
    assert err["param"] == "n" and f"at most {capacity}" in err["message"]
    err = envelope(post(url, {"prompt": ["x", "y"], "n": 4, "max_tokens": 1}, "/v1/completions"))
    assert err["param"] == "n" and "8 completions" in err["message"]
    assert envelope(post(url, {"messages": MSG, "n": 65}))["param"] == "n"
    # exactly what the server holds is served
    r = post(url, {"prompt": ["x", "y", "z"], "n": 2, "max_tokens": 1}, "/v1/completions")
    assert r.status_code == 200 and len(r.json()["choices"]) == capacity
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=["x"] * 1000, max_tokens=1)


@pytest.mark.parametrize("kind", ["image_url", "input_image", "image"])
def test_image_content_is_refused(url, kind):
    part = {"type": kind, kind: {"url": "data:image/png;base64,iVBORw0KGgo="}}
    for content in ([part], [{"type": "text", "text": "what is this?"}, part]):
        err = envelope(post(url, {"messages": [{"role": "user", "content": content}]}))
        index = len(content) - 1
        assert err["param"] == f"messages[0].content[{index}]"
        assert "text only" in err["message"] and "image content is not supported" in err["message"]
    r = post(url, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 2})
    assert r.status_code == 200


def test_stop_string_limits(url):
    err = envelope(post(url, {"messages": MSG, "stop": [f"s{i}" for i in range(17)]}))
    assert err["param"] == "stop" and "at most 16" in err["message"]
    err = envelope(post(url, {"prompt": "x", "stop": "y" * 300}, "/v1/completions"))
    assert err["param"] == "stop" and "at most 256 characters" in err["message"]
    r = post(url, {"messages": MSG, "max_tokens": 2, "stop": [chr(0x4E00 + i) * 256 for i in range(16)]})
    assert r.status_code == 200


@pytest.mark.parametrize("field,value", [("stream", "yes"), ("stream", 1), ("logprobs", "true"), ("n", "2"),
                                         ("max_tokens", 5.0), ("max_tokens", True), ("temperature", "0.5"),
                                         ("seed", "7"), ("stop_token_ids", ["3"])])
def test_strict_types(url, field, value):
    err = envelope(post(url, {"messages": MSG, field: value}))
    assert err["param"].startswith(field)  # stop_token_ids[0]


@pytest.mark.parametrize("field,literal", [("temperature", "NaN"), ("top_p", "Infinity"),
                                           ("presence_penalty", "-Infinity")])
def test_non_finite_numbers(url, field, literal):
    body = f'{{"messages": [{{"role": "user", "content": "hi"}}], "{field}": {literal}}}'.encode()
    r = httpx.post(url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    err = envelope(r)
    assert err["param"] == field and "finite" in err["message"]


def test_integers_are_numbers(url):
    r = post(url, {"messages": MSG, "temperature": 0, "top_p": 1, "max_tokens": 2})
    assert r.status_code == 200


def test_token_ids_outside_the_vocabulary(url):
    err = envelope(post(url, {"messages": MSG, "stop_token_ids": [10**12], "max_tokens": 2}))
    assert err["param"] == "stop_token_ids" and "outside the vocabulary" in err["message"]
    err = envelope(post(url, {"prompt": "x", "logit_bias": {str(10**12): 1}}, "/v1/completions"))
    assert err["param"] == "logit_bias" and "outside the vocabulary" in err["message"]
    assert envelope(post(url, {"prompt": [10**12]}, "/v1/completions"))["param"] == "prompt"


def test_configured_limits(tokenizer):
    from minimind.serve.limits import ServeLimits

    limits = ServeLimits(max_prompt_chars=50, max_stop_strings=2, max_stop_chars=3, tokenizer_workers=1)
    with serve(make_app(tokenizer, limits)) as base:
        err = envelope(post(base, {"prompt": "x" * 51}, "/v1/completions"))
        assert err["param"] == "prompt" and "at most 50 characters (max_prompt_chars)" in err["message"]
        assert post(base, {"prompt": "x" * 50, "max_tokens": 1}, "/v1/completions").status_code == 200
        assert "at most 2" in envelope(post(base, {"messages": MSG, "stop": ["a", "b", "c"]}))["message"]
        assert "at most 3 characters" in envelope(post(base, {"messages": MSG, "stop": "abcd"}))["message"]
        ok = post(base, {"prompt": "x", "stop": ["abc", "d"], "max_tokens": 1}, "/v1/completions")
        assert ok.status_code == 200
        # the limit is on the rendered prompt: the chat template's own text counts
        assert envelope(post(base, {"messages": MSG}))["param"] == "messages"
