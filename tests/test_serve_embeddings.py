"""/v1/embeddings with the official openai client (float and base64): each vector is the unit-length mean of the tiny
model's final hidden states over the input's tokens, computed here by a plain forward of the torch model."""
from __future__ import annotations

import asyncio
import base64
import struct

import httpx
import pytest
import torch

from conftest import serve, tiny_model, tokenizer_dir

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

MAX_LEN = 64


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))


@pytest.fixture(scope="module")
def model():
    return tiny_model("minimind3", vocab_size=6400)


def make_app(model, tokenizer):
    from minimind.engine import LLM
    from minimind.serve import create_app

    llm = LLM(model, tokenizer=tokenizer, max_num_seqs=3, max_model_len=MAX_LEN, max_num_batched_tokens=16)
    return create_app(llm, served_model_name="tiny")


@pytest.fixture(scope="module")
def url(model, tokenizer):
    with serve(make_app(model, tokenizer)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def direct(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        mean = model.model(torch.tensor([ids]))[0].float().mean(dim=0)
    return (mean / mean.norm()).tolist()


LONG = ("A longer sentence that takes more than one prompt chunk of sixteen tokens to compute, so its mean is summed "
        "over several steps.")
TEXTS = ["Hello world", "猫是一种动物", LONG]


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_embeddings_are_the_unit_mean_of_final_hidden_states(client, model, tokenizer, encoding_format):
    # the openai client asks for base64 when no format is given and decodes it itself; "float" sends the JSON list
    kwargs = {"encoding_format": "float"} if encoding_format == "float" else {}
    r = client.embeddings.create(model="tiny", input=TEXTS, **kwargs)
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == "tiny"
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))
    for d, x in zip(r.data, ids):
        assert len(d.embedding) == model.config.hidden_size
        assert d.embedding == pytest.approx(direct(model, x), abs=1e-4)


def test_base64_is_little_endian_float32(url, model, tokenizer):
    body = httpx.post(url + "/v1/embeddings", json={"input": "Hello world", "encoding_format": "base64"},
                      timeout=60).json()
    raw = base64.b64decode(body["data"][0]["embedding"])
    vector = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert list(vector) == pytest.approx(direct(model, tokenizer.encode("Hello world", add_special_tokens=False)),
                                         abs=1e-4)


def test_token_id_inputs_and_errors(client, model, url):
    one = client.embeddings.create(model="tiny", input=[5, 6, 7, 8], encoding_format="float")
    assert len(one.data) == 1 and one.data[0].embedding == pytest.approx(direct(model, [5, 6, 7, 8]), abs=1e-4)
    many = client.embeddings.create(model="tiny", input=[[5, 6], [9] * MAX_LEN], encoding_format="float")
    assert many.data[1].embedding == pytest.approx(direct(model, [9] * MAX_LEN), abs=1e-4)
    assert many.usage.prompt_tokens == 2 + MAX_LEN
    hidden = model.config.hidden_size
    same = client.embeddings.create(model="tiny", input="x", dimensions=hidden, encoding_format="float")
    assert len(same.data[0].embedding) == hidden
    for body, param in (({"input": "x", "dimensions": 8}, "dimensions"), ({"input": [1] * (MAX_LEN + 1)}, "input"),
                        ({"input": []}, "input"), ({"input": [[1], [99999]]}, "input"), ({"input": ""}, "input"),
                        ({"input": "x", "encoding_format": "int8"}, "encoding_format")):
        r = httpx.post(url + "/v1/embeddings", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert httpx.post(url + "/v1/embeddings", json={"input": "x", "model": "nope"}, timeout=60).status_code == 404


def test_embed_truncates_on_request(model, tokenizer):
    """embed(), which Ollama's /api/embed also calls: an input over the context is cut to its first max_model_len
    tokens with truncate=True."""
    from minimind.serve.embeddings import embed
    from minimind.serve.errors import APIError

    app = make_app(model, tokenizer)
    ctx = app.state.ctx
    engine = ctx.engines["tiny"]

    async def run():
        engine.start()
        try:
            with pytest.raises(APIError, match="maximum context length"):
                await embed(ctx, engine, [list(range(1, MAX_LEN + 10))])
            return await embed(ctx, engine, [list(range(1, MAX_LEN + 10)), "Hello"], truncate=True)
        finally:
            engine.shutdown()
            ctx.close()

    vectors, tokens = asyncio.run(run())
    assert tokens == MAX_LEN + len(tokenizer.encode("Hello", add_special_tokens=False))
    assert vectors[0] == pytest.approx(direct(model, list(range(1, MAX_LEN + 1))), abs=1e-4)
