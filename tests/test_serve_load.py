"""Bounded load on a loopback server (stops by itself): concurrent greedy requests equal the same requests alone,
and 64 streaming clients with 10% disconnecting mid-stream leave every KV slot free, lose no request and never
mix two requests' tokens."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ASGI_SERVERS, serve, start_server, tiny_model, tokenizer_dir
from test_serve import wait_idle

pytest.importorskip("fastapi")


@pytest.fixture(scope="module", params=[(loop, asgi) for asgi in ASGI_SERVERS for loop in ("thread", "inline")],
                ids=lambda p: "-".join(p))
def server(request):
    """The engine stepped on its own thread, and inline on the event loop (`--engine-loop`), under each ASGI
    server."""
    from transformers import AutoTokenizer

    from minimind.engine import LLM
    from minimind.serve import create_app
    from minimind.serve.engine_client import AsyncEngine

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))
    llm = LLM(tiny_model(vocab_size=6400), tokenizer=tok, max_num_seqs=8, max_model_len=128)
    loop, asgi = request.param
    app = create_app({"tiny": AsyncEngine(llm, max_queue=128, inline=loop == "inline")}, max_queue=128)
    with serve(app, server=asgi) as url:
        yield url, app.state.ctx.engines["tiny"]


def body(i: int, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": f"问题 {i}: " + "天" * (i % 7)}],
            "max_tokens": 16, "temperature": 0, "ignore_eos": True, **extra}


async def complete(client: httpx.AsyncClient, i: int) -> str:
    r = await client.post("/v1/chat/completions", json=body(i))
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def test_concurrent_greedy_equals_alone(server):
    url, engine = server

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            alone = [await complete(client, i) for i in range(16)]
            together = await asyncio.gather(*(complete(client, i) for i in range(16)))
            return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == alone
    wait_idle(engine)


def test_64_streams_with_disconnects(server):
    url, engine = server
    disconnect = set(range(0, 64, 10))  # 7 of 64 clients (~10%) leave after a few chunks

    async def stream(client: httpx.AsyncClient, i: int):
        ids, text, finish = set(), "", None
        async with client.stream("POST", "/v1/chat/completions", json=body(i, stream=True)) as r:
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                if not line:
                    continue
                n += 1
                if i in disconnect and n == 3:
                    return i, None, None, None  # leaving the block closes the connection mid-stream
                payload = line[6:]
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                ids.add(chunk["id"])
                for c in chunk["choices"]:
                    text += c["delta"].get("content") or ""
                    finish = c["finish_reason"] or finish
        return i, ids, text, finish

    async def run():
        limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            results = await asyncio.wait_for(asyncio.gather(*(stream(client, i) for i in range(64))), timeout=600)
            expected = await asyncio.gather(*(complete(client, i) for i in range(64) if i not in disconnect))
        return results, expected

    results, expected = asyncio.run(run())
    finished = [r for r in results if r[1] is not None]
    assert len(finished) == 64 - len(disconnect)  # no request lost
    assert len({next(iter(r[1])) for r in finished}) == len(finished)  # one id per stream, never shared
    assert all(len(r[1]) == 1 and r[3] == "length" for r in finished)
    assert [r[2] for r in finished] == expected  # every stream got exactly its own tokens
    s = wait_idle(engine)  # every slot free again, nothing queued
    assert s["running"] == 0 and s["waiting"] == 0


@pytest.mark.parametrize("asgi", ASGI_SERVERS)
@pytest.mark.parametrize("inline", [False, True], ids=["thread", "inline"])
def test_graceful_shutdown_drains_running_streams(inline, asgi):
    import threading
    import time

    from transformers import AutoTokenizer

    from minimind.engine import LLM
    from minimind.serve import create_app
    from minimind.serve.engine_client import AsyncEngine

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))
    llm = LLM(tiny_model(vocab_size=6400), tokenizer=tok, max_num_seqs=2, max_model_len=128)
    original = llm.runner.sample

    stepped_on = set()

    def slow(logits, seqs):  # long enough that shutdown begins mid-stream
        stepped_on.add(threading.get_ident())
        time.sleep(0.03)
        return original(logits, seqs)

    llm.runner.sample = slow
    llm.runner.fused = None  # its multi-token decode call samples in C, past this sampler
    app = create_app({"tiny": AsyncEngine(llm, inline=inline)})
    runner, thread, url = start_server(app, asgi)
    events = []
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json=body(1, stream=True, max_tokens=40)) as r:
        lines = r.iter_lines()
        events.append(next(lines))
        runner.stop()  # like SIGTERM
        events += [line for line in lines if line]
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert llm.scheduler.slots.num_free == 2
    assert (stepped_on == {thread.ident}) == inline  # inline: on the thread running the event loop


def test_a_non_streamed_request_gets_only_its_final_output():
    """stream=False hands the handler one output, the final one, equal to the last of the same request streamed."""
    from transformers import AutoTokenizer

    from minimind.engine import LLM, SamplingParams
    from minimind.serve.engine_client import AsyncEngine

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))
    engine = AsyncEngine(LLM(tiny_model(vocab_size=6400), tokenizer=tok, max_num_seqs=2, max_model_len=64))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ids = tok.encode("你好，世界")

    async def main():
        streamed = [o async for o in engine.submit(ids, params, stream=True)]
        whole = [o async for o in engine.submit(ids, params, stream=False)]
        return streamed, whole

    try:
        streamed, whole = asyncio.run(main())
    finally:
        engine.shutdown()
    # streamed outputs a busy reader did not take in time are merged (serve/channel.py): 1 to 8 of them
    assert 1 <= len(streamed) <= 8 and [o.finished for o in streamed] == [False] * (len(streamed) - 1) + [True]
    assert [t for o in streamed for t in o.outputs[0].delta_token_ids] == streamed[-1].outputs[0].token_ids
    assert len(whole) == 1 and whole[0].finished
    assert whole[0].outputs[0].token_ids == streamed[-1].outputs[0].token_ids
    assert whole[0].outputs[0].text == streamed[-1].outputs[0].text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_chunk_template_gives_the_bytes_of_the_whole_object(text):
    """sse.ChunkTemplate (a plain text delta spliced into a pre-rendered event) against sse() of the object."""
    from minimind.serve.sse import ChunkTemplate, sse

    def make(t):
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 2, "delta": {"content": t}, "logprobs": None, "finish_reason": None}],
                "usage": None}

    assert ChunkTemplate(make)(text) == sse(make(text))
