"""`minimind bench --server` end to end on a tiny random model: our engine in-process and a real `minimind serve`
subprocess on 127.0.0.1 at 1 and 2 concurrent streaming clients (no llama-server). Checks the JSON, the
table, the chart, that every request generated exactly the requested tokens, and that no server outlives
the run. No timing asserts."""
from __future__ import annotations

import contextlib
import json
import shutil
import threading

import pytest

from conftest import tiny_model, tokenizer_dir
from minimind.apps import bench, bench_client, bench_http, bench_server
from minimind.apps.bench_http import free_port

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")


def _children() -> set[int]:
    import os
    from pathlib import Path

    me = str(os.getpid())
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # ppid
            out.add(int(stat.parent.name))
    return out


def test_server_bench_end_to_end(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model(vocab_size=6400).save_pretrained(folder)
    for f in tokenizer_dir("minimind2").iterdir():
        shutil.copy(f, folder / f.name)
    before = _children()
    out_json, out_png = tmp_path / "server.json", tmp_path / "server.png"
    rc = bench.main(["--server", "--models", str(folder), "--dtypes", "fp32", "--concurrency", "1,2",
                     "--decode-tokens", "5", "--prompt-len", "8", "--repeats", "2", "--threads", "1", "--peers", "",
                     "--stream-interval", "2", "--json", str(out_json), "--png", str(out_png)])
    assert rc == 0
    assert _children() <= before, "a server subprocess outlived the bench"
    report = json.loads(out_json.read_text())
    assert {"machine", "args", "notes", "results"} <= report.keys()
    assert report["notes"] == [], report["notes"]
    assert report["args"]["stream_interval"] == 2  # and `minimind serve` took the flag: it served every round
    rows = {r["impl"]: r for r in report["results"]}
    assert set(rows) == {bench_server.ENGINE, bench_server.SERVE}
    for impl, r in rows.items():
        assert r["model"] == "tiny" and r["dtype"] == "fp32"
        for n in (1, 2):
            assert f"error@{n}" not in r, r[f"error@{n}"]
            assert r[f"completion_tokens@{n}"] == [5] * (2 * n), (impl, n)  # 2 rounds of n requests
            assert len(r[f"rounds_tps@{n}"]) == 2
            for key in ("agg_tps", "ttft_p50_ms", "ttft_p99_ms", "ttft_mean_ms", "peak_rss_mb"):
                assert r[f"{key}@{n}"] > 0, (impl, key, n)
            assert r[f"ttft_p99_ms@{n}"] >= r[f"ttft_p50_ms@{n}"]
    assert all(f"http_overhead_pct@{n}" in rows[bench_server.SERVE] for n in (1, 2))
    assert all(f"http_overhead_best_pct@{n}" in rows[bench_server.SERVE] for n in (1, 2))
    serve = rows[bench_server.SERVE]
    assert all(len(serve[f"http_overhead_rounds_pct@{n}"]) == len(serve[f"rounds_tps@{n}"]) for n in (1, 2))
    table = capsys.readouterr().out
    assert "minimind bench --server" in table and "minimind serve" in table
    assert "HTTP cost per round, quartiles" in table
    assert out_png.stat().st_size > 1000


def test_http_cost_pairs_rounds_of_the_same_turn():
    # the machine was fast for the engine's first round only: two of our three rounds are 5 % under the engine's
    # round of their turn (our best round against the engine's best would read 1 - 190 / 220 = 13.6 %)
    engine, ours = [220, 150, 100], [190, 142.5, 95]
    assert bench_server.http_cost(ours, engine) == pytest.approx(5.0)
    # the median of the per-round costs: one disturbed round does not move it
    assert bench_server.http_cost([190, 75, 95, 152], [200, 150, 100, 160]) == pytest.approx(5.0)
    assert bench_server.round_costs([190, 75], [200, 150]) == pytest.approx([5.0, 50.0])


def test_llama_server_lookup(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-server on this PATH: skipped with a note
    path, note = bench_http.find_llama_server(None)
    assert path is None and "--llama-server" in note and "docs/benchmarks.md" in note
    with pytest.raises(SystemExit, match="not an executable"):  # an explicit wrong path is an error
        bench_http.find_llama_server(str(tmp_path / "nope"))
    monkeypatch.setenv("LLAMA_SERVER", str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match=r"\$LLAMA_SERVER"):
        bench_http.find_llama_server(None)


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--server", "--help"])
    assert exc.value.code == 0
    assert "LLAMA_BUILD_SERVER=ON" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        bench.main(["--server", "--concurrency", "0"])
    assert exc.value.code == 2 and ">= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--server", "--dtypes", "fp16"])
    assert "unknown dtype" in capsys.readouterr().err


HEALTHY = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_server_process_failures_and_cleanup(tmp_path):
    import sys

    from minimind.apps.bench_http import ServerProcess

    dead = ServerProcess("broken", [sys.executable, "-c", "print('no model here'); raise SystemExit(3)"],
                         tmp_path / "broken.log", free_port())
    with pytest.raises(RuntimeError, match=r"(?s)broken exited with code 3.*no model here"):
        dead.__enter__()
    port = free_port()
    srv = ServerProcess("healthy", [sys.executable, "-c", HEALTHY, str(port)], tmp_path / "ok.log", port)
    with pytest.raises(KeyboardInterrupt), srv:  # Ctrl-C in the middle of a measurement still stops the server
        assert srv.peak_rss_mb() > 0
        raise KeyboardInterrupt
    assert srv.proc.poll() is not None


def _sse_server(events: list[tuple[float, bytes]], close: bool, sent: dict):
    """An asyncio HTTP server answering any request with a chunked SSE body: (delay s, event bytes) in order;
    closes the connection at the end unless close=False (then holds it open until the client leaves). sent[i] is
    the perf_counter time just before event i is written, sent["end"] just before the body's last chunk."""
    import asyncio
    import time

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i, (delay, event) in enumerate(events):
            await asyncio.sleep(delay)
            sent[i] = time.perf_counter()
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        sent["end"] = time.perf_counter()  # before the last bytes: the client may see them before this thread goes on
        writer.write(b"0\r\n\r\n")
        if close:
            writer.close()
        else:
            await reader.read()  # the client closes

    return asyncio.start_server(handle, "127.0.0.1", 0)


@contextlib.contextmanager
def _serving(server_factory):
    """An asyncio server (a coroutine that starts it) running on its own thread; yields its port."""
    import asyncio

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(server_factory)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        server.close()  # then, as asyncio.run does: handlers still waiting (a stalled stream) are cancelled
        pending = asyncio.all_tasks(loop)
        for t in pending:
            t.cancel()
        async def drain():
            await asyncio.gather(*pending, return_exceptions=True)

        loop.run_until_complete(drain())
        loop.close()


@pytest.mark.parametrize("close", [True, False])
def test_client_times_first_chunk_and_end_with_quiet_reads(monkeypatch, close):
    """After the first text chunk the client reads only at its polls: the first chunk must be timed before the
    next one is even sent, every later chunk counted, the usage event's count used, and the stream must end after
    the body's last bytes, whether the server closes the connection or keeps it open. Orderings only, no
    thresholds; the request timeout just turns a hang into a failure."""
    text = [b'data: {"choices":[{"text":"t%d"}]}\n\n' % i for i in range(30)]
    events = [(0, b'data: {"choices":[{"text":""}]}\n\n'), (0, text[0]), (0.3, text[1])]
    events += [(0.005, t) for t in text[2:]]
    events += [(0, b'data: {"choices":[],"usage":{"completion_tokens":31}}\n\n'), (0, b"data: [DONE]\n\n")]
    sent: dict = {}
    with _serving(_sse_server(events, close, sent)) as port:
        [r] = bench_client.stream_requests(f"http://127.0.0.1:{port}", "/v1/completions", [{}], timeout=20)
    assert r["chunks"] == 30 and r["tokens"] == 31
    assert sent[1] <= r["first"] < sent[2]  # the first text chunk, seen before the second was written
    assert r["end"] >= sent["end"]


def _keepalive_server(events, connections: list, close_after: bool):
    """An SSE server that answers request after request on a connection (HTTP/1.1 keep-alive), or closes it after
    each response without saying so (as an idle timeout would); counts its connections."""
    import asyncio

    async def handle(reader, writer):
        connections.append(1)
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")  # a request body has no blank line: the next read skips it
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for delay, event in events:
                await asyncio.sleep(delay)
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            if close_after:
                break
        writer.close()

    return asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("case", ["kept alive", "closed after each response", "closed, noticed only when reused"])
def test_client_pool_keeps_connections_alive_across_rounds(monkeypatch, case):
    """With a Pool, the second round runs on the first round's connections, and each stream ends at its chunked
    body's end although the connection stays open. A
    connection the server closed meanwhile is replaced: found closed before reuse, or failing when reused."""
    if case == "closed, noticed only when reused":
        monkeypatch.setattr(bench_client.Pool, "take", lambda self: self.idle.pop() if self.idle else None)
    pad = b" " * 200  # chunks the size of real ones
    text = [b'data: {"choices":[{"text":"t%d"}],%s"x":0}\n\n' % (i, pad) for i in range(40)]
    events = [(0, t) for t in text[:2]] + [(0.002, t) for t in text[2:]]
    events += [(0, b'data: {"choices":[],"usage":{"completion_tokens":40}}\n\n'), (0, b"data: [DONE]\n\n")]
    connections: list = []
    pool, rounds = bench_client.Pool(), []
    with _serving(_keepalive_server(events, connections, case != "kept alive")) as port:
        for _ in range(2):
            results = bench_client.stream_requests(f"http://127.0.0.1:{port}", "/v1/completions", [{}] * 3,
                                                   timeout=20, pool=pool)
            assert [(r["chunks"], r["tokens"]) for r in results] == [(40, 40)] * 3
            assert len(pool.idle) == 3
            rounds.append(results)
    pool.close()
    assert len(connections) == (3 if case == "kept alive" else 6)
    assert bench_client.summarize(rounds, 3)["rounds_connections@3"] == ([3, 0] if case == "kept alive" else [3, 3])


@pytest.mark.parametrize("stamps", [True, False])
def test_client_times_a_quiet_stream_by_the_kernels_stamps(monkeypatch, stamps):
    """128 text chunks 2 ms apart on a kept-alive connection: after the first, the client does not wake per chunk
    but reads at its polls (a handful of reads, not one per chunk), and the stream's end is the arrival of its last
    bytes as the kernel stamped it, not the poll that read them (the first poll comes 1 s after the start, the
    body ends after ~0.26 s; the end must be timed within 0.5 s of the server's last write). Without stamps every chunk is read as it comes. Counts and orderings, no speed thresholds."""
    monkeypatch.setattr(bench_client, "POLL_INTERVAL", 1.0)
    if not stamps:
        monkeypatch.setattr(bench_client._Stream, "_stamp", staticmethod(lambda sock: False))
    events = [(0.002, b'data: {"choices":[{"text":"t%d"}],%s"x":0}\n\n' % (i, b" " * 200)) for i in range(128)]
    events += [(0, b'data: {"choices":[],"usage":{"completion_tokens":128}}\n\n'), (0, b"data: [DONE]\n\n")]
    reads, sent = [], {}
    receive = bench_client._Stream.receive
    monkeypatch.setattr(bench_client._Stream, "receive", lambda self, where: reads.append(1) or receive(self, where))
    with _serving(_sse_server(events, False, sent)) as port:
        [r] = bench_client.stream_requests(f"http://127.0.0.1:{port}", "/v1/completions", [{}], timeout=20,
                                           pool=bench_client.Pool())
    assert (r["chunks"], r["tokens"]) == (128, 128)
    assert sent[0] <= r["first"] < sent[1]
    assert sent["end"] <= r["end"] < sent["end"] + 0.5
    assert len(reads) <= 10 if stamps else len(reads) >= 64, len(reads)


def test_client_reports_http_errors_refused_connections_and_timeouts():
    """Each failure is raised with what happened, never an empty or partial result."""
    async def refuse(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 21\r\n\r\n{\"error\": \"no model\"}")
        await writer.drain()
        writer.close()

    import asyncio

    with _serving(asyncio.start_server(refuse, "127.0.0.1", 0)) as port, \
            pytest.raises(RuntimeError, match=r"(?s)HTTP 404 from http://127\.0\.0\.1:\d+/v1/completions.*no model"):
        bench_client.stream_requests(f"http://127.0.0.1:{port}", "/v1/completions", [{}, {}], timeout=20)
    async def hang_up(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    with _serving(asyncio.start_server(hang_up, "127.0.0.1", 0)) as port, \
            pytest.raises(ConnectionError, match="closed the connection without an HTTP response"):
        bench_client.stream_requests(f"http://127.0.0.1:{port}", "/v1/completions", [{}], timeout=20)
    with pytest.raises(ConnectionError, match="cannot connect"):
        bench_client.stream_requests(f"http://127.0.0.1:{free_port()}", "/v1/completions", [{}], timeout=20)
    stalled = [(0, b'data: {"choices":[{"text":"a"}]}\n\n'), (30, b"data: [DONE]\n\n")]
    with _serving(_sse_server(stalled, True, {})) as port, \
            pytest.raises(TimeoutError, match="1 of 1 streams .* unfinished after 0.5 s"):
        bench_client.stream_requests(f"http://127.0.0.1:{port}", "/v1/completions", [{}], timeout=0.5)


def test_tally_counts_text_chunks_and_reads_usage_and_errors():
    """The load generator's end-of-stream scan (bench_client.tally) against a hand-written block of events."""
    block = (b'data: {"choices":[{"text":"a\\"text\\":\\"b"}],"usage":null}\n\n'  # the key's letters inside a string
             b'data: {"choices":[{"text":""}],"usage":null}\n\n'  # an empty text is no chunk
             b'data: {"choices":[{"text":"c"}],"usage":null}\n\n'
             b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7}}\n\n'
             b"data: [DONE]\n\n")
    assert bench_client.tally(block) == (2, 7, None, True)
    assert bench_client.tally(b'data: {"choices":[{"text":"x"}]}\n\n') == (1, None, None, False)
    err = b'data: {"error":{"message":"boom","code":500}}\n\ndata: [DONE]\n\n'
    assert bench_client.tally(err) == (0, None, {"message": "boom", "code": 500}, True)
