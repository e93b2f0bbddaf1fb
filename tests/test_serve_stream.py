"""Streamed outputs handed over on the engine's thread: the order of a request's outputs and of the bytes on the
wire. Real sockets on 127.0.0.1 and a real engine on a tiny model."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import pytest

from conftest import tiny_model, tokenizer_dir


def _chunks(raw: bytes) -> list[bytes]:
    """The payloads of an HTTP/1.1 chunked body (no final empty chunk needed)."""
    out, pos = [], 0
    while pos < len(raw):
        eol = raw.index(b"\r\n", pos)
        size = int(raw[pos:eol], 16)
        out.append(raw[eol + 2:eol + 2 + size])
        pos = eol + 2 + size + 2
    return out


@pytest.mark.parametrize("batched", [False, True], ids=["one by one", "a step's chunks in one C call"])
def test_socket_writer_keeps_order_when_the_client_stops_reading(batched):
    """Sent on the socket while it takes them; once a send takes only part of a chunk, the rest and every later
    chunk go through the transport, even after the client has made room again by reading: bytes sent to the
    socket then would overtake the ones still waiting in the transport. Batched: written between the Sender's
    begin() and flush() as an engine step's hand-over does, several chunks per writer and flush."""
    from minimind.serve.socket_writer import Sender, SocketWriter

    sender = Sender.create()
    if sender is None:
        pytest.skip("no C compiler: the engine's kernels (and the Sender) cannot be built here")

    async def main():
        loop = asyncio.get_running_loop()
        made = loop.create_future()

        class Keep(asyncio.Protocol):
            def connection_made(self, transport):
                made.set_result(transport)

        server = await loop.create_server(Keep, "127.0.0.1", 0)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(server.sockets[0].getsockname())
        client.setblocking(False)
        transport = await made
        raw = transport.get_extra_info("socket")
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        w = SocketWriter(socket.socket(fileno=os.dup(raw.fileno())), transport, loop, sender)
        expected, received = [], bytearray()

        def put(i):
            if batched:
                sender.begin()
            for k in range(3 if batched else 1):
                data = b"chunk %06d.%d " % (i, k) + b"x" * 500
                expected.append(data)
                w.write(data)
            if batched:
                sender.flush()

        def read_what_is_there():
            try:
                while data := client.recv(65536):
                    received.extend(data)
            except BlockingIOError:
                pass

        i = 0
        while not w.queued:  # the client reads nothing: the kernel's buffers fill up
            put(i)
            i += 1
            assert i < 10_000, "the socket never refused a chunk"
        read_what_is_there()  # room again, while the rest of a chunk still waits for the event loop
        for j in range(i, i + 20):
            put(j)
        w.close()
        deadline = time.monotonic() + 30
        while len(received) < sum(len(b"%x\r\n\r\n" % len(d)) + len(d) for d in expected):
            assert time.monotonic() < deadline, "not every chunk arrived"
            await asyncio.sleep(0.01)  # the transport writes what it holds
            read_what_is_there()
        transport.close()
        client.close()
        server.close()
        return expected, bytes(received)

    expected, received = asyncio.run(main())
    assert _chunks(received) == expected


def test_outputs_still_on_their_way_through_the_event_loop_come_first():
    """A request subscribed with any_thread gets its outputs on the engine's thread, but only once every output
    already handed to the event loop has been delivered there: the deltas, joined, are the final answer."""
    from transformers import AutoTokenizer

    from minimind.engine import LLM, SamplingParams
    from minimind.serve.engine_client import AsyncEngine

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))
    engine = AsyncEngine(LLM(tiny_model(vocab_size=6400), tokenizer=tok, max_num_seqs=2, max_model_len=512))
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    def wait_in_flight(stream, n):  # blocks the event loop (on purpose) until n outputs wait for it
        deadline = time.monotonic() + 30
        while stream.in_flight < n:
            assert time.monotonic() < deadline, f"{stream.in_flight} outputs on their way to the loop, not {n}"
            time.sleep(0.001)

    async def main():
        handle = engine.submit(tok.encode("你好"), params)
        while not handle._stream.items:  # the first outputs came through the event loop
            await asyncio.sleep(0.001)
        stream = handle._stream
        wait_in_flight(stream, 2)  # the loop is busy: the engine's next outputs wait in its queue
        in_flight = stream.in_flight
        got, threads, done = [], [], asyncio.get_running_loop().create_future()

        def on_output(out):
            got.append(out)
            threads.append(threading.get_ident())
            if out.finished:
                done.get_loop().call_soon_threadsafe(done.set_result, None)

        handle.push_to(on_output, lambda exc: None, any_thread=True)
        wait_in_flight(stream, in_flight + 2)  # still busy: the engine steps on and must keep handing them over
        await done
        return got, threads

    try:
        got, threads = asyncio.run(main())
    finally:
        engine.shutdown()
    assert threading.get_ident() in threads and set(threads) - {threading.get_ident()}, "both threads delivered"
    final = got[-1].outputs[0]
    assert final.finished and len(final.token_ids) == 400
    assert [t for o in got for t in o.outputs[0].delta_token_ids] == final.token_ids
    assert "".join(o.outputs[0].delta_text for o in got) == final.text


def test_plain_text_chunks_are_written_without_the_renderer(monkeypatch):
    """A streamed completion with one choice and no logprobs: the engine's thread writes each chunk that only
    brings new text itself (OutputChannel.plain), so the renderer sees little more than the final output; with
    logprobs every output goes through it. Both streams carry the non-streamed text, JSON escapes included, in
    events with the bytes orjson writes for them."""
    import httpx
    import orjson
    from transformers import AutoTokenizer

    from minimind.engine import LLM
    from minimind.serve import create_app
    from minimind.serve.completions import CompletionStream
    from test_serve import script, serve

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind-3")))
    llm = LLM(tiny_model("minimind3", vocab_size=6400), tokenizer=tok, max_num_seqs=2, max_model_len=512)
    script(llm, tok, {"text": 'She said "hi" \\ then left.\nNext\tline: é, 你好, </tag> ' * 2})
    rendered = []
    render = CompletionStream.render

    def counted(self, k, out):
        rendered.append(out.finished)
        return render(self, k, out)

    monkeypatch.setattr(CompletionStream, "render", counted)
    app = create_app({"tiny": llm})
    body = {"model": "tiny", "prompt": "x", "max_tokens": 200}
    with serve(app) as url:
        if app.state.ctx.engines["tiny"].sender is None:
            pytest.skip("the C kernels cannot be built here: streams go through the event loop")
        answer = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        whole, tokens = answer["choices"][0], answer["usage"]["completion_tokens"]
        assert '"' in whole["text"] and "\\" in whole["text"] and "\n" in whole["text"] and tokens > 20
        for logprobs in (None, 1):
            rendered.clear()
            raw = httpx.post(url + "/v1/completions", json={**body, "stream": True, "logprobs": logprobs},
                             timeout=60).content
            events = [e for e in raw.split(b"\n\n") if e]
            assert events[-1] == b"data: [DONE]"
            objs = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
            assert [b"data: " + orjson.dumps(o) for o in objs] == events[:-1]
            assert "".join(c["text"] for o in objs for c in o["choices"]) == whole["text"]
            assert objs[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] == "stop"
            assert rendered[-1] is True and rendered.count(True) == 1
            if logprobs is None:  # the outputs before the response subscribed may come through the event loop
                assert rendered.count(False) < tokens // 2, rendered
            else:
                assert rendered.count(False) >= tokens - 1


def test_a_plain_chunk_that_cannot_be_written_ends_the_stream_with_an_error(monkeypatch):
    """If the engine's thread cannot render a plain text chunk, the output goes to the renderer, which reports
    the failure in-band: an error event and [DONE], not a chunk that silently goes missing."""
    import httpx
    from transformers import AutoTokenizer

    from minimind.engine import LLM
    from minimind.serve import create_app, socket_writer, sse
    from test_serve import script, serve

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind-3")))
    llm = LLM(tiny_model("minimind3", vocab_size=6400), tokenizer=tok, max_num_seqs=2, max_model_len=512)
    script(llm, tok, {"text": "one two three four five six seven eight nine ten " * 20})
    call = sse.ChunkTemplate.__call__

    def refuse(self, text):
        if "ive" in text:
            raise ValueError("cannot encode this text")
        return call(self, text)

    monkeypatch.setattr(sse.ChunkTemplate, "__call__", refuse)
    close = socket_writer.SocketWriter.close

    def slow_close(self):  # the engine steps on meanwhile: no plain chunk may follow the failed one
        time.sleep(0.3)
        close(self)

    monkeypatch.setattr(socket_writer.SocketWriter, "close", slow_close)
    app = create_app({"tiny": llm})
    with serve(app) as url:
        if app.state.ctx.engines["tiny"].sender is None:
            pytest.skip("the C kernels cannot be built here: streams go through the event loop")
        raw = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 300,
                                                        "stream": True}, timeout=60).content
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]" and b"cannot encode this text" in events[-2]
    texts = [c["text"] for e in events[:-2] for c in json.loads(e)["choices"]]
    assert "".join(texts) == "one two three four f"  # tokens: one| two| three| four| f|ive
