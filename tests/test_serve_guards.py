"""Guards of `minimind serve`: body size (413), request-head deadline and size (slowloris), Host/Origin allowlist (403),
exact public routes, empty API key, SSE in /openapi.json, exit on SIGTERM/SIGINT. Real servers on 127.0.0.1 only: the
app under conftest's runners, uvicorn with the guarded protocol in a thread, `minimind serve` over a tiny model."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import serve, tiny_model, tokenizer_dir

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

LONG = 30  # seconds: an upper bound that only a hang reaches, never a measured duration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envelope(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# ---------------------------------------------------------------- the app in-process
@pytest.fixture(scope="module")
def llm():  # a factory: each app gets its own engine
    from transformers import AutoTokenizer

    from minimind.engine import LLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))
    return lambda: LLM(tiny_model(vocab_size=6400), tokenizer=tok, max_num_seqs=2, max_model_len=64)


def app_with(llm, **kwargs):
    from minimind.serve import create_app

    return create_app({"tiny": llm()}, guided=False, **kwargs)


def test_chunked_body_over_the_limit_is_413_and_under_it_is_served(llm):
    from minimind.serve.limits import ServeLimits

    def chunks(n):
        for _ in range(n):
            yield b" " * 100
        yield b'{"model": "tiny", "prompt": "hi", "max_tokens": 1}'

    with serve(app_with(llm, limits=ServeLimits(max_body_bytes=1000))) as url, httpx.Client(timeout=LONG) as c:
        headers = {"content-type": "application/json"}
        assert c.post(url + "/v1/completions", content=chunks(5), headers=headers).status_code == 200  # chunked
        err = envelope(c.post(url + "/v1/completions", content=chunks(20), headers=headers), 413)
        assert "1000" in err["message"] and err["code"] == "body_too_large"
        too_long = b'{"model": "tiny", "prompt": "' + b"x" * 2000 + b'"}'
        envelope(c.post(url + "/v1/completions", content=too_long, headers=headers), 413)  # by Content-Length
        assert c.get(url + "/health").status_code == 200  # the same keep-alive connection still serves


def test_host_and_origin_allowlist(llm):
    from minimind.serve.guards import effective_allowed_hosts
    from minimind.serve.limits import ServeLimits

    loopback = ServeLimits(allowed_hosts=effective_allowed_hosts("127.0.0.1", None))
    with serve(app_with(llm, limits=loopback)) as url, httpx.Client(timeout=LONG) as c:
        port = url.rsplit(":", 1)[1]
        assert "--allowed-hosts evil.example" in envelope(c.get(url + "/v1/models", headers={"host": "evil.example"}),
                                                          403)["message"]
        assert "Origin" in envelope(c.get(url + "/v1/models", headers={"origin": "http://evil.example"}), 403)["message"]
        envelope(c.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1},
                        headers={"host": f"evil.example:{port}"}), 403)
        envelope(c.get(url + "/v1/models", headers={"origin": "null"}), 403)  # sandboxed pages, file://
        for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}", "LOCALHOST"):
            assert c.get(url + "/v1/models", headers={"host": host}).status_code == 200, host
        assert c.get(url + "/v1/models", headers={"origin": "http://localhost:5173"}).status_code == 200
    widened = ServeLimits(allowed_hosts=effective_allowed_hosts("127.0.0.1", ["evil.example"]))
    with serve(app_with(llm, limits=widened)) as url, httpx.Client(timeout=LONG) as c:
        for headers in ({"host": "evil.example:9"}, {"origin": "https://evil.example"}, {"host": "localhost"}):
            assert c.get(url + "/v1/models", headers=headers).status_code == 200, headers
        envelope(c.get(url + "/v1/models", headers={"host": "other.example"}), 403)
    with serve(app_with(llm)) as url:  # create_app without an allowlist checks nothing
        assert httpx.get(url + "/v1/models", headers={"host": "evil.example"}, timeout=LONG).status_code == 200


def test_effective_allowed_hosts():
    from minimind.serve.guards import effective_allowed_hosts, host_name
    from minimind.serve.limits import LOOPBACK_HOSTS

    assert effective_allowed_hosts("127.0.0.1", None) == effective_allowed_hosts("::1", None) == LOOPBACK_HOSTS
    assert effective_allowed_hosts("localhost", ["a.test"]) == (*LOOPBACK_HOSTS, "a.test")
    assert effective_allowed_hosts("192.168.1.5", ["a.test"]) == (*LOOPBACK_HOSTS, "a.test")
    assert effective_allowed_hosts("0.0.0.0", None) is None and effective_allowed_hosts("::1", ["*"]) is None
    assert [host_name(h) for h in ("LocalHost:80", "[::1]:8000", "::1", "a.test.", "[::1", "")] == \
        ["localhost", "::1", "::1", "a.test", None, None]


def test_public_routes_match_exactly(llm):
    with serve(app_with(llm, api_key="k")) as url, httpx.Client(timeout=LONG) as c:
        for path in ("/health", "/openapi.json", "/docs", "/metrics"):
            assert c.get(url + path).status_code == 200, path
        for path in ("/healthz", "/health/x", "/metricsx", "/docs/x", "/openapi.json.bak", "/v1/models"):
            envelope(c.get(url + path), 401)
        assert c.get(url + "/v1/models", headers={"authorization": "Bearer k"}).status_code == 200
    with pytest.raises(ValueError, match="empty"):  # an empty key would turn auth off
        app_with(llm, api_key="")


def test_openapi_declares_the_sse_responses(llm):
    with serve(app_with(llm)) as url, httpx.Client(timeout=LONG) as c:
        paths = c.get(url + "/openapi.json").json()["paths"]
        for path in ("/v1/chat/completions", "/v1/completions"):
            content = paths[path]["post"]["responses"]["200"]["content"]
            assert {"application/json", "text/event-stream"} <= set(content), path
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "stream": True}  # what the server really sends
        with c.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert list(r.iter_lines())[-2:] == ["data: [DONE]", ""]


# ---------------------------------------------------------------- the guarded uvicorn protocol, both parsers
async def echo_length(scope, receive, send):
    """Answers the body's length."""
    n, more = 0, True
    while more:
        message = await receive()
        n, more = n + len(message.get("body", b"")), message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(str(n)))]})
    await send({"type": "http.response.body", "body": str(n).encode()})


@contextlib.contextmanager
def guarded_uvicorn(kind: str, timeout: float = 1.0, max_bytes: int = 4096):
    from minimind.serve.connections import guarded_protocol

    if kind == "httptools":
        pytest.importorskip("httptools")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(echo_length, host="127.0.0.1", port=port, log_level="critical",
                                           lifespan="off", ws="none", http=guarded_protocol(timeout, max_bytes, kind)))
    (thread := threading.Thread(target=server.run, daemon=True)).start()
    deadline = time.monotonic() + LONG
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(LONG)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=LONG)


def read_response(sock: socket.socket) -> bytes:
    """The next response (Content-Length body) -> b"<status line> <body>"; reads byte by byte, so that the next
    pipelined response stays in the socket."""
    def line() -> bytes:
        out = b""
        while not out.endswith(b"\n") and (byte := sock.recv(1)):
            out += byte
        return out

    status, length = line().rstrip(), 0
    while (header := line()) not in (b"\r\n", b""):
        name, _, value = header.partition(b":")
        length = int(value) if name.lower() == b"content-length" else length
    return status + b" " + (sock.recv(length, socket.MSG_WAITALL) if length else b"")


def trickle_until_closed(sock: socket.socket, chunks=b"X-Slow: y\r\n" * 1000, every: float = 0.2) -> bool:
    """Sends one byte per `every` s until the server closes the connection -> True, or LONG s pass -> False."""
    sock.settimeout(every)
    deadline = time.monotonic() + LONG
    for i in range(len(chunks)):
        if time.monotonic() > deadline:
            return False
        try:
            sock.sendall(chunks[i:i + 1])
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:  # reset or broken pipe: closed
            return True
    return False


@pytest.mark.parametrize("kind", ["httptools", "h11"])
def test_slow_heads_are_closed_and_slow_bodies_are_not(kind):
    with guarded_uvicorn(kind) as port:
        silent = connect(port)  # never sends a byte
        slow = connect(port)
        slow.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert trickle_until_closed(slow)
        assert silent.recv(1) == b""
        with connect(port) as kept:  # the second request on a keep-alive connection gets its own deadline
            kept.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            assert read_response(kept) == b"HTTP/1.1 200 OK 3"
            assert trickle_until_closed(kept, b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: y\r\n" * 1000)
        with connect(port) as body:  # the deadline ends with the head: a body may take longer
            body.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n")
            for byte in b"12345678":
                time.sleep(0.3)
                body.sendall(bytes([byte]))
            assert read_response(body) == b"HTTP/1.1 200 OK 8"
        with connect(port) as pipelined:
            pipelined.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nabGET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert [read_response(pipelined), read_response(pipelined)] == [b"HTTP/1.1 200 OK 2", b"HTTP/1.1 200 OK 0"]


@pytest.mark.parametrize("pieces", [1, 16])
@pytest.mark.parametrize("kind", ["httptools", "h11"])
def test_oversized_head_is_refused(kind, pieces):
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n"
    with guarded_uvicorn(kind, timeout=LONG, max_bytes=4096) as port:
        with connect(port) as sock:  # a big body in the same write as its head is not part of the head
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n" + b"b" * 20000)
            assert read_response(sock) == b"HTTP/1.1 200 OK 20000"
        with connect(port) as sock:
            try:
                for i in range(pieces):
                    sock.sendall(head[i * len(head) // pieces:(i + 1) * len(head) // pieces])
                    time.sleep(0.05 * (pieces > 1))
                reply = b"".join(iter(lambda: sock.recv(4096), b""))
            except OSError:  # reset while sending
                reply = b""
            assert b"200 OK" not in reply  # closed (h11 answers 400 first)


# ---------------------------------------------------------------- `minimind serve`
def test_limit_flags_reach_the_app_and_uvicorn(monkeypatch):
    from types import SimpleNamespace

    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from minimind.serve import launch
    from minimind.serve.limits import ServeLimits

    flags = ["--max-body-bytes", "11", "--max-prompt-chars", "12", "--max-stop-strings", "13", "--max-stop-chars",
             "14", "--tokenizer-workers", "3", "--header-timeout", "1.5", "--max-header-bytes", "999",
             "--keep-alive-timeout", "2.5", "--max-connections", "7", "--allowed-hosts", "a.test, b.test"]
    assert launch.limits_from_args(launch.build_parser().parse_args(flags)) == ServeLimits(
        max_body_bytes=11, max_prompt_chars=12, max_stop_strings=13, max_stop_chars=14, tokenizer_workers=3,
        header_timeout=1.5, max_header_bytes=999, keep_alive_timeout=2.5, max_connections=7,
        allowed_hosts=("localhost", "127.0.0.1", "[::1]", "::1", "a.test", "b.test"))
    seen = {}
    monkeypatch.setattr(launch, "build_app", lambda args: SimpleNamespace(state=SimpleNamespace(
        ctx=SimpleNamespace(engines={"m": None}))))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    assert launch.main(flags) == 0
    assert (seen["limit_concurrency"], seen["timeout_keep_alive"], seen["h11_max_incomplete_event_size"]) == \
        (7, 2.5, 999)
    assert issubclass(seen["http"], AutoHTTPProtocol) and seen["http"] is not AutoHTTPProtocol  # what "auto" picks


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torch

    folder = tmp_path_factory.mktemp("weights")
    torch.save(tiny_model(vocab_size=6400, hidden_size=64).state_dict(), folder / "full_sft_64.pth")
    return folder


@contextlib.contextmanager
def serve_process(weights, port: int, *flags: str):
    """`minimind serve` on 127.0.0.1:port, once /health answers; killed on exit if still running."""
    cmd = [sys.executable, "-m", "minimind", "serve", "--load_from", str(tokenizer_dir("minimind2")), "--save_dir",
           str(weights), "--weight", "full_sft", "--hidden_size", "64", "--port", str(port), "--max-model-len",
           "4096", "--threads", "1", "--log-level", "warning", *flags]
    with tempfile.TemporaryFile() as log:  # not a pipe: one nobody reads could fill and block the server
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ))
        proc.log = log
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.25)
            else:
                raise AssertionError(f"minimind serve did not start: {stderr_of(proc)[-2000:]}")
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def stderr_of(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read().decode(errors="replace")


@pytest.fixture(scope="module")
def served(weights):
    port = free_port()
    with serve_process(weights, port, "--header-timeout", "1", "--allowed-hosts", "example.test"):
        yield port


def test_serve_refuses_a_50mb_body_while_health_answers(served):
    url = f"http://127.0.0.1:{served}"
    health, took = [], {}

    def poll_health():
        with httpx.Client(timeout=LONG) as c:
            while "upload" not in took:
                start = time.monotonic()
                health.append(c.get(url + "/health").status_code)
                took["health"] = max(took.get("health", 0), time.monotonic() - start)

    (poller := threading.Thread(target=poll_health)).start()
    start = time.monotonic()
    try:
        r = httpx.post(url + "/v1/completions", content=b"x" * (50 * 10**6), timeout=LONG,
                       headers={"content-type": "application/json"})
    finally:
        took["upload"] = time.monotonic() - start
        poller.join(LONG)
    envelope(r, 413)
    assert health and set(health) == {200}
    print(f"50 MB upload refused in {took['upload']:.2f} s; slowest /health meanwhile {took['health']:.3f} s")


def test_serve_closes_50_slowloris_connections(served):
    url = f"http://127.0.0.1:{served}"
    socks = [connect(served) for _ in range(50)]
    for s in socks:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert httpx.get(url + "/health", timeout=LONG).status_code == 200  # served while they hang
    with ThreadPoolExecutor(len(socks)) as pool:  # each keeps sending a header byte every 0.2 s
        closed = list(pool.map(trickle_until_closed, socks))
    for s in socks:
        s.close()
    assert all(closed), f"{closed.count(False)} of 50 slow connections still open"
    assert httpx.get(url + "/health", timeout=LONG).status_code == 200


def test_serve_host_guard(served):
    url = f"http://127.0.0.1:{served}"
    envelope(httpx.get(url + "/v1/models", headers={"host": "evil.example"}, timeout=LONG), 403)
    envelope(httpx.get(url + "/v1/models", headers={"origin": "http://evil.example"}, timeout=LONG), 403)
    for headers in ({"host": f"localhost:{served}"}, {"host": "example.test"}, {"origin": "http://example.test"}):
        assert httpx.get(url + "/v1/models", headers=headers, timeout=LONG).status_code == 200, headers


@pytest.mark.parametrize("env, flags", [({}, ["--api-key", ""]), ({"MINIMIND_API_KEY": ""}, [])],
                         ids=["flag", "env"])
def test_serve_empty_api_key_exits_2(env, flags):
    res = subprocess.run([sys.executable, "-m", "minimind", "serve", *flags], capture_output=True, text=True,
                         timeout=120, env={**os.environ, **env}, check=False)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "api-key" in lines[0] and "Traceback" not in res.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_drains_and_exits_on_signal(weights, sig):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serve_process(weights, port, "--drain-timeout", "60") as proc:
        body = {"prompt": [5, 6, 7], "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=LONG) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):  # the stream is running
                pass
            proc.send_signal(sig)
            rest = list(lines)
        assert "data: [DONE]" in rest  # the running request was drained, not cut
        start = time.monotonic()
        code = proc.wait(timeout=LONG)
        print(f"exited {time.monotonic() - start:.2f} s after its last stream ended, code {code}")
        assert code in (0, -sig, 128 + sig), code
        assert "Traceback" not in stderr_of(proc)
    with pytest.raises(OSError):  # nothing listens on the port any more, and a new server can bind it
        socket.create_connection(("127.0.0.1", port), timeout=1)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
