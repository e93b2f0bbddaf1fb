"""The streaming path: the per-request OutputCollector (merging what a slow reader has not taken), and streamed
responses over HTTP (the bytes on the wire, the error event after the headers, several prompts interleaved),
under each ASGI server."""
from __future__ import annotations

import asyncio
import json

import httpx
import orjson
import pytest

from conftest import ASGI_SERVERS, serve, tiny_model, tokenizer_dir
from test_serve import script, wait_idle

pytest.importorskip("fastapi")
pytest.importorskip("hypercorn")

TRICKY = 'She said "hi" \\ then left.\nNext\tline: é, 你好, </tag> {"k": [1]} '


def _out(rid, finished, *completions, cached=0, metrics=None):
    """A RequestOutput of completions given as (index, text, token_ids, delta_text, delta_ids, finish)."""
    from minimind.engine import CompletionOutput, RequestOutput
    from minimind.engine.sequence import TokenLogprob

    outs = [CompletionOutput(i, text, ids, finish, "x" if finish else None, [TokenLogprob(t, -0.5) for t in ids],
                             delta, dids) for i, text, ids, delta, dids, finish in completions]
    return RequestOutput(rid, [1, 2], outs, finished, cached, metrics or {})


def test_collector_merges_what_the_reader_has_not_taken():
    """Three outputs put before the reader comes back: it gets one, whose deltas are the three joined and whose
    cumulative fields are the last one's; each completion of the request is merged on its own, and another
    request's key is never merged into it."""
    from minimind.serve.channel import OutputCollector

    async def main():
        c = OutputCollector(asyncio.get_running_loop())
        c.put(0, _out("r", False, (0, "a", [5], "a", [5], None), (1, "x", [7], "x", [7], None), cached=1,
                      metrics={"t": 1}))
        c.put(1, _out("s", False, (0, "z", [9], "z", [9], None)))
        c.put(0, _out("r", False, (0, "ab\"", [5, 6], "b\"", [6], None), (1, "x", [7, 8], "", [8], None), cached=2,
                      metrics={"t": 2}))
        c.put(0, _out("r", True, (0, "ab\"c", [5, 6, 4], "c", [4], "stop"), (1, "xy", [7, 8, 3], "y", [3], "length"),
                      cached=3, metrics={"t": 3}))
        got = c.get()
        try:  # something is pending: get() completes without ever suspending (no task switch)
            got.send(None)
            raise AssertionError("get() suspended although an output was pending")
        except StopIteration as done:
            k, out = done.value
        assert k == 0 and out.request_id == "r" and out.finished and out.num_cached_tokens == 3
        assert out.metrics == {"t": 3}
        a, b = out.outputs
        assert (a.index, a.delta_text, a.delta_token_ids) == (0, "ab\"c", [5, 6, 4])
        assert (a.text, a.token_ids, a.finish_reason, a.stop_reason) == ("ab\"c", [5, 6, 4], "stop", "x")
        assert [lp.token_id for lp in a.logprobs] == [5, 6, 4]
        assert (b.index, b.delta_text, b.delta_token_ids, b.text, b.finish_reason) == (1, "xy", [7, 8, 3], "xy",
                                                                                       "length")
        k, out = await c.get()  # the other request, untouched
        assert k == 1 and out.request_id == "s" and out.outputs[0].delta_text == "z"
        reader = asyncio.ensure_future(c.get())
        await asyncio.sleep(0)
        assert not reader.done()  # nothing pending: the reader waits ...
        c.put(1, _out("s", True, (0, "zq", [9, 2], "q", [2], "stop")))
        k, out = await asyncio.wait_for(reader, 2)  # ... and a put wakes it
        assert k == 1 and out.outputs[0].delta_text == "q"  # taken in time: nothing merged into it
        gone = asyncio.ensure_future(c.get())
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        c.put(2, _out("t", False, (0, "w", [1], "w", [1], None)))  # its reader left: no error, the output stays
        assert (await asyncio.wait_for(c.get(), 2))[0] == 2
        c.fail(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="engine step failed: RuntimeError: boom"):
            await asyncio.wait_for(c.get(), 2)

    asyncio.run(main())


def test_a_reader_that_is_behind_gets_one_merged_output_from_the_engine():
    """A real engine on its own thread finishes a 200-token request while its handler reads nothing: the handler
    then gets one output, which carries every token and all the text as its delta; no queue of 200."""
    from transformers import AutoTokenizer

    from minimind.engine import LLM, SamplingParams
    from minimind.serve.engine_client import AsyncEngine

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))
    llm = LLM(tiny_model(vocab_size=6400), tokenizer=tok, max_num_seqs=2, max_model_len=512)
    reference = llm.generate(tok.encode("你好"), SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    engine = AsyncEngine(llm)

    async def main():
        handle = engine.submit(tok.encode("你好"), SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        while engine.num_active:  # the engine's hand-overs reach the collector meanwhile
            await asyncio.sleep(0.01)
        return [o async for o in handle]

    try:
        outs = asyncio.run(main())
    finally:
        engine.shutdown()
    final = reference[0].outputs[0]
    assert len(outs) == 1 and outs[0].finished
    o = outs[0].outputs[0]
    assert o.delta_token_ids == o.token_ids == final.token_ids and len(final.token_ids) == 200
    assert o.delta_text == o.text == final.text


@pytest.fixture(scope="module", params=ASGI_SERVERS)
def scripted(request):
    """A server whose model writes TRICKY twice, then stops."""
    from transformers import AutoTokenizer

    from minimind.engine import LLM
    from minimind.serve import create_app

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind-3")))
    llm = LLM(tiny_model("minimind3", vocab_size=6400), tokenizer=tok, max_num_seqs=4, max_model_len=512)
    holder = {"text": TRICKY * 2}
    script(llm, tok, holder)
    app = create_app({"tiny": llm})
    with serve(app, server=request.param) as url:
        yield url, holder, app.state.ctx.engines["tiny"]


def _events(raw: bytes) -> list[bytes]:
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    return [e.removeprefix(b"data: ") for e in events[:-1]]


@pytest.mark.parametrize("route,extra", [("completions", {}), ("completions", {"logprobs": 1}), ("chat", {}),
                                         ("chat", {"logprobs": True, "top_logprobs": 2})],
                         ids=["completion", "completion logprobs", "chat", "chat logprobs"])
def test_streamed_text_is_the_non_streamed_text(scripted, route, extra):
    """Quotes, backslashes, newlines, tabs and non-ASCII text arrive intact, each event exactly the bytes
    orjson writes for its object, and joined they are the text of the same request not streamed."""
    url, _, _ = scripted
    path = "/v1/completions" if route == "completions" else "/v1/chat/completions"
    body = {"model": "tiny", "max_tokens": 200, **extra,
            **({"prompt": "x"} if route == "completions" else {"messages": [{"role": "user", "content": "hi"}]})}
    whole = httpx.post(url + path, json=body, timeout=60).json()["choices"][0]
    text = whole["text"] if route == "completions" else whole["message"]["content"]
    assert text == TRICKY * 2 and whole["finish_reason"] == "stop"
    raw = httpx.post(url + path, json={**body, "stream": True}, timeout=60).content
    events = _events(raw)
    objs = [orjson.loads(e) for e in events]
    assert [orjson.dumps(o) for o in objs] == events
    if route == "completions":
        streamed = "".join(c["text"] for o in objs for c in o["choices"])
    else:
        streamed = "".join(c["delta"].get("content") or "" for o in objs for c in o["choices"])
    assert streamed == text and objs[-1]["choices"][0]["finish_reason"] == "stop"


def test_an_error_after_the_headers_is_an_error_event(scripted, monkeypatch):
    """A chunk that cannot be rendered mid-stream ends the stream with an SSE error event and [DONE] (the status
    line went out long before), after exactly the text of the chunks before it."""
    from minimind.serve import sse

    url, holder, engine = scripted
    holder["text"] = "one two three four five six seven eight nine ten " * 20
    call = sse.ChunkTemplate.__call__

    def refuse(self, text):
        if "ive" in text:
            raise ValueError("cannot encode this text")
        return call(self, text)

    monkeypatch.setattr(sse.ChunkTemplate, "__call__", refuse)
    try:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 300,
                                                      "stream": True}, timeout=60)
    finally:
        holder["text"] = TRICKY * 2
    assert r.status_code == 200
    events = _events(r.content)
    error = json.loads(events[-1])["error"]
    assert "cannot encode this text" in error["message"] and error["type"] == "internal_server_error"
    sent = "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])
    # tokens: one| two| three| four| f|ive: the chunk that brings "ive" (it may carry earlier tokens too, merged
    # while the handler was behind) fails, and nothing after it goes out
    assert "one two three four f".startswith(sent), sent
    wait_idle(engine)  # the request was aborted: its slot is free


def test_several_prompts_stream_interleaved(scripted):
    """One response over two prompts' requests sends each output as it comes, not one prompt after the other."""
    url, holder, _ = scripted
    holder["text"] = "one two three four five six seven eight nine ten " * 20
    body = {"model": "tiny", "prompt": ["a", "b"], "max_tokens": 200, "stream": True}
    try:
        raw = httpx.post(url + "/v1/completions", json=body, timeout=60).content
    finally:
        holder["text"] = TRICKY * 2
    order = [c["index"] for e in _events(raw) for c in json.loads(e)["choices"]]
    assert set(order) == {0, 1}
    last_of_first = max(i for i, k in enumerate(order) if k == order[0])
    assert any(k != order[0] for k in order[:last_of_first]), order


def _slow_llm(max_num_seqs: int):
    """A tiny engine whose every sampled token takes 5 ms: 400 tokens take seconds, so a request cannot finish by
    itself while a test makes its client go away."""
    import time

    from transformers import AutoTokenizer

    from minimind.engine import LLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))
    llm = LLM(tiny_model(vocab_size=6400), tokenizer=tok, max_num_seqs=max_num_seqs, max_model_len=512)
    sample = llm.runner.sample

    def slow(logits, seqs):
        time.sleep(0.005)
        return sample(logits, seqs)

    llm.runner.sample = slow
    llm.runner.fused = None  # its multi-token decode call samples in C, past this sampler
    return llm


@pytest.mark.parametrize("asgi", ASGI_SERVERS)
def test_a_client_that_leaves_while_its_socket_is_full_aborts_the_request(asgi):
    """The client reads nothing (the server's send waits for room), then closes the connection: the request ends
    as aborted, not by running out of tokens, and frees its slot."""
    import socket
    import time

    from minimind.serve import create_app

    llm = _slow_llm(max_num_seqs=4)
    app = create_app({"tiny": llm})
    engine = app.state.ctx.engines["tiny"]
    ended = {}
    engine.step_hooks.append(lambda outs: ended.update((o.request_id, o.outputs[0].finish_reason)
                                                       for o in outs if o.finished))
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
                       "ignore_eos": True, "n": 4, "logprobs": True, "top_logprobs": 20, "stream": True}).encode()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    with serve(app, listener, asgi) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 30
            while not any(s.output_token_ids for s in llm.scheduler.running):  # streaming, buffers filling
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.01)
            time.sleep(0.3)  # ~60 tokens of ~4 KB each: far more than both buffers hold
        wait_idle(engine)
    assert list(ended.values()) == ["abort"]


def test_a_send_that_raises_for_a_gone_client_aborts_the_request():
    """An ASGI 2.4 server's `send` raises OSError once the client has gone, which ends the response while the
    body generator waits at a yield and is never resumed: the request is aborted right then, not once the
    generator is garbage-collected (the exception held here keeps it alive)."""
    import time

    from minimind.serve import create_app
    from minimind.serve.engine_client import AsyncEngine

    llm = _slow_llm(max_num_seqs=2)
    engine = AsyncEngine(llm)
    ended = {}
    engine.step_hooks.append(lambda outs: ended.update((o.request_id, o.outputs[0].finish_reason)
                                                       for o in outs if o.finished))
    app = create_app({"tiny": engine})
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 400, "ignore_eos": True,
                       "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "root_path": "", "query_string": b"", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def main():
        requests = [{"type": "http.request", "body": body, "more_body": False}]
        bodies = []

        async def receive():
            if requests:
                return requests.pop()
            await asyncio.Event().wait()  # a 2.4 server need not report the disconnect here

        async def send(message):
            if message["type"] == "http.response.body":
                bodies.append(message)
                if len(bodies) == 3:
                    raise OSError("the client has gone")

        caught = None
        try:
            await app(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - Starlette's ClientDisconnect: kept, and its frames with it
            caught = exc
        deadline = time.monotonic() + 30
        while not ended:
            assert time.monotonic() < deadline, "the request was not aborted"
            await asyncio.sleep(0.01)
        return caught, bodies

    try:
        caught, bodies = asyncio.run(main())
    finally:
        engine.shutdown()
    assert len(bodies) == 3 and caught is not None
    assert list(ended.values()) == ["abort"]


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_choice_that_finished_before_its_siblings_ends_once(route):
    """A request's outputs repeat a completion that has finished until its siblings finish too: its choice still
    gets exactly one finish chunk."""
    from types import SimpleNamespace

    from minimind.serve.completions import ChatStream, CompletionStream
    from minimind.serve.protocol import ChatCompletionRequest, CompletionRequest

    handle = SimpleNamespace(engine=SimpleNamespace(token_text=str), prompt_token_ids=[1, 2], final=None)
    if route == "chat":
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=2, stream=True)
        renderer = ChatStream(req, [handle], "id", "m", {"started_in_think": False, "parse_tools": False})
    else:
        renderer = CompletionStream(CompletionRequest(prompt="x", n=2, stream=True), [handle], "id", "m")
    steps = [_out("r", False, (0, "a", [5], "a", [5], "length"), (1, "b", [6], "b", [6], None)),
             _out("r", False, (0, "a", [5], "", [], "length"), (1, "bc", [6, 7], "c", [7], None)),
             _out("r", True, (0, "a", [5], "", [], "length"), (1, "bcd", [6, 7, 8], "d", [8], "stop"))]
    events = [json.loads(chunk[len(b"data: "):]) for out in steps for chunk in renderer.render(0, out)]
    finishes = [(c["index"], c["finish_reason"]) for e in events for c in e["choices"] if c["finish_reason"]]
    assert finishes == [(0, "length"), (1, "stop")]
