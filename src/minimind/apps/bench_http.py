"""The moving parts of `minimind bench --server`: child processes (HTTP servers on 127.0.0.1 and a JSON-lines
worker) that are always stopped, even on an error or Ctrl-C, and an asyncio client that streams /v1/completions
and times every request.

Both `minimind serve` and llama-server get the same request: a token-id prompt, `max_tokens` with `ignore_eos`
(so every request generates exactly that many tokens), plain sampling at `temperature` (top_k/top_p/min_p off),
`stream: true` with `stream_options.include_usage` (the final chunk's usage gives the token count).
"""
from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pdeathsig():
    """prctl(PR_SET_PDEATHSIG, SIGKILL) resolved here, in the parent: the child only calls it (no dlopen or
    import between fork and exec), so a server dies with the bench even if the bench is SIGKILLed."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)


class ChildProcess:
    """A subprocess in its own session, always stopped on exit from `with` (error and Ctrl-C included): SIGTERM
    to its process group, SIGKILL after `stop_timeout`; it also gets SIGKILL if the bench itself dies."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, *, env: dict | None = None,
                 stop_timeout: float = 15.0, pipes: bool = False):
        self.name, self.cmd, self.log_path, self.env = name, cmd, Path(log_path), env
        self.stop_timeout, self.pipes = stop_timeout, pipes
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        with open(self.log_path, "wb") as log:
            pipe = subprocess.PIPE if self.pipes else subprocess.DEVNULL
            self.proc = subprocess.Popen(self.cmd, stdin=pipe, stdout=pipe if self.pipes else log,
                                         stderr=log if self.pipes else subprocess.STDOUT, env=self.env,
                                         start_new_session=True, text=self.pipes,
                                         preexec_fn=_pdeathsig())  # noqa: PLW1509 - only a pre-resolved C call
        try:
            self.ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def ready(self) -> None:
        """Block until the child can take work (subclasses)."""

    def log_tail(self, lines: int = 12) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def died(self) -> RuntimeError:
        return RuntimeError(f"{self.name} exited with code {self.proc.returncode} (log {self.log_path}):\n"
                            f"{self.log_tail()}")

    def peak_rss_mb(self) -> float | None:
        """VmHWM of the child (None once it has exited or off Linux)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except (OSError, AttributeError):
            pass
        return None

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)  # its own session: the group is the child and its children only
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


class ServerProcess(ChildProcess):
    """An HTTP server on 127.0.0.1:port, ready once GET /health answers 200."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, port: int, *, env: dict | None = None,
                 ready_timeout: float = 300.0, stop_timeout: float = 15.0):
        super().__init__(name, cmd, log_path, env=env, stop_timeout=stop_timeout)
        self.port, self.ready_timeout = port, ready_timeout
        self.base_url = f"http://127.0.0.1:{port}"

    def ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it was ready "
                                   f"(log {self.log_path}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {self.ready_timeout:.0f} s (log {self.log_path}):\n"
                                   f"{self.log_tail()}")
            time.sleep(0.25)


class LineWorker(ChildProcess):
    """A child speaking JSON lines: one request line in, one reply line out (stderr goes to the log)."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, *, env: dict | None = None,
                 timeout: float = 900.0):
        super().__init__(name, cmd, log_path, env=env, pipes=True)
        self.timeout = timeout

    def call(self, message) -> dict:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.proc.wait(timeout=10)
            raise self.died() from None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else None
        if line is None:
            raise TimeoutError(f"{self.name} gave no answer in {self.timeout:.0f} s (log {self.log_path})")
        if not line:
            self.proc.wait(timeout=10)
            raise self.died()
        return json.loads(line)


def find_llama_server(explicit: str | None) -> tuple[str | None, str | None]:
    """-> (path, note). An explicit path (--llama-server or $LLAMA_SERVER) that is not an executable is an
    error; no llama-server at all skips the peer with a note."""
    given = explicit or os.environ.get("LLAMA_SERVER")
    if given:
        path = Path(given).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SystemExit(f"minimind bench --server: llama-server {given!r} (from "
                             f"{'--llama-server' if explicit else '$LLAMA_SERVER'}) is not an executable file")
        return str(path), None
    found = shutil.which("llama-server")
    if found:
        return found, None
    return None, ("llama-server peer skipped: not found (pass --llama-server PATH or set $LLAMA_SERVER; "
                  "`minimind bench --server --help` and docs/benchmarks.md show how to build it)")


def llama_server_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(("version", "built"))]
    return "; ".join(lines) or "unknown"


# ---------------------------------------------------------------- the client
def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); q in [0, 100]."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class _SSEReader:
    """Server-sent events out of an HTTP/1.1 response body, chunked (uvicorn, llama-server) or not, with nothing
    but byte scans: the load generator shares the 2 CPUs with the server it measures, and an httpx line iterator
    plus a json.loads per event cost ~0.3 ms per token here, more than the server's own HTTP work."""

    def __init__(self, chunked: bool):
        self.chunked, self.raw, self.body, self.done = chunked, b"", b"", False

    def _append(self, data: bytes) -> None:
        if not self.chunked:
            self.body += data
            return
        raw, pos, parts = self.raw + data, 0, [self.body]
        while True:  # positions into one buffer: no copy of the remainder per chunk
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(raw[pos:eol].split(b";")[0], 16)
            if size == 0:
                self.done = True
                break
            if len(raw) < eol + 2 + size + 2:
                break
            parts.append(raw[eol + 2:eol + 2 + size])
            pos = eol + 2 + size + 2
        self.raw, self.body = raw[pos:], b"".join(parts)

    def feed(self, data: bytes) -> list[bytes]:
        """The complete `data:` events so far, one by one."""
        self._append(data)
        events = self.body.split(b"\n\n")
        self.body = events.pop()  # an incomplete event waits for more bytes
        return [e for e in events if e.startswith(b"data:")]

    def feed_block(self, data: bytes) -> bytes:
        """The complete events so far as one block, for tally()."""
        self._append(data)
        end = self.body.rfind(b"\n\n")
        cut = end + 2 if end >= 0 else 0
        block, self.body = self.body[:cut], self.body[cut:]
        return block


def tally(block: bytes) -> tuple[int, int | None, dict | None, bool]:
    """(chunks with text, usage completion_tokens or None, error object or None, [DONE] seen) of a block of SSE
    events, by whole-buffer scans: a per-event loop in the load generator would cost the measured server ~10 us
    of CPU per token. `"text":"` cannot occur inside a JSON string (its quotes would be escaped)."""
    chunks = block.count(b'"text":"') - block.count(b'"text":""')
    error = None
    at = block.find(b'data: {"error"')
    if at >= 0:
        error = json.loads(block[at + 5:block.find(b"\n\n", at)])["error"]
    tokens = None
    at = block.rfind(b'"usage":{')
    if at >= 0:
        start = block.rfind(b"data:", 0, at) + 5
        end = block.find(b"\n\n", at)
        tokens = json.loads(block[start:end if end >= 0 else len(block)])["usage"].get("completion_tokens")
    return chunks, tokens, error, b"data: [DONE]" in block


# Once the first token is in (TTFT is timed chunk by chunk), the client asks the kernel to wake it only when
# CLIENT_RCVLOWAT bytes are waiting (SO_RCVLOWAT; about 20 chunks): the load generator runs on the same CPUs as
# the server it measures, and a wake-up per token (0.08-0.10 ms of its CPU at one client on this machine) is
# taken out of that server's engine, where a remote client costs it nothing. The end of a stream still wakes
# it at once (both servers close the connection after [DONE]: the request says `Connection: close`); a server
# that kept it open would be read again after BATCHED_READ_TIMEOUT, with the low-water mark back at one byte.
CLIENT_RCVLOWAT = 4096
BATCHED_READ_TIMEOUT = 1.0


def _set_rcvlowat(writer: asyncio.StreamWriter, nbytes: int) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_RCVLOWAT"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
    except OSError:
        return False
    return True


async def stream_completion(base_url: str, path: str, body: dict) -> dict:
    """One streaming request -> {start, first, end, tokens, chunks}; `first` is the arrival of the first chunk
    with non-empty text (a token that is only part of a UTF-8 character is held back by both servers). Plain
    HTTP/1.1 over asyncio streams (see _SSEReader); only error events and the usage event are parsed as JSON."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    payload = json.dumps(body).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    first, chunks, tokens = None, 0, None
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                     .encode() + payload)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        chunked = b"transfer-encoding: chunked" in head.lower()
        if status != 200:
            detail = (head + await reader.read(300)).decode(errors="replace")[:400]
            raise RuntimeError(f"HTTP {status} from {base_url}{path}: {detail}")
        sse = _SSEReader(chunked)
        finished, batched, rest = False, False, []
        while not finished and not sse.done:
            if batched:
                try:
                    data = await asyncio.wait_for(reader.read(65536), BATCHED_READ_TIMEOUT)
                except TimeoutError:
                    batched = not _set_rcvlowat(writer, 1)
                    continue
            else:
                data = await reader.read(65536)
            if not data:
                break
            if first is not None:  # only the end matters now: kept as it comes, tallied in one go at the end
                finished = b"[DONE]" in (rest[-1][-8:] if rest else b"") + data
                rest.append(data)
                continue
            now = time.perf_counter()
            for event in sse.feed(data):
                event = event[5:].strip()
                if event == b"[DONE]":
                    finished = True
                    break
                if event.startswith(b'{"error"') or b'"usage":{' in event:
                    obj = json.loads(event)
                    if "error" in obj:
                        raise RuntimeError(f"error event from {base_url}: {json.dumps(obj['error'])[:300]}")
                    tokens = obj["usage"].get("completion_tokens")
                if b'"text":"' in event and b'"text":""' not in event:
                    chunks += 1
                    if first is None:
                        first = now
                        batched = _set_rcvlowat(writer, CLIENT_RCVLOWAT)
        end = time.perf_counter()  # the last byte is in: the tally below is not the server's time
        if rest:
            more, usage_tokens, error, _ = tally(sse.feed_block(b"".join(rest)))
            if error is not None:
                raise RuntimeError(f"error event from {base_url}: {json.dumps(error)[:300]}")
            chunks += more
            tokens = usage_tokens if usage_tokens is not None else tokens
    finally:
        writer.close()
    return {"start": start, "first": first or end, "end": end, "tokens": chunks if tokens is None else tokens,
            "chunks": chunks}


async def _round(base_url: str, model: str, prompts: list[list[int]], max_tokens: int, temperature: float) -> list[dict]:
    bodies = [{"model": model, "prompt": p, "max_tokens": max_tokens, "ignore_eos": True, "temperature": temperature,
               "top_p": 1.0, "top_k": 0, "min_p": 0.0,  # plain sampling: top_k 0 = off in both servers
               "stream": True, "stream_options": {"include_usage": True}} for p in prompts]
    return list(await asyncio.gather(*(stream_completion(base_url, "/v1/completions", b) for b in bodies)))


def run_round(base_url: str, model: str, prompts: list[list[int]], max_tokens: int,
              temperature: float = 1.0) -> list[dict]:
    """All prompts sent at once as concurrent streaming requests; returns each request's timings. The client runs
    on uvloop when it is installed (uvicorn[standard] brings it): it shares the two CPUs with the server it
    measures, and every bit of its CPU is taken from the engine of whichever server is measured."""
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run
    return run(_round(base_url, model, prompts, max_tokens, temperature))


def summarize(rounds: list[list[dict]], n: int) -> dict:
    """Aggregate tokens/s of a round = its tokens / wall clock from the first send to the last byte. Reports the
    best round (the least disturbed on a shared machine), its TTFT p50 / p99 / mean, every round's aggregate and
    TTFT p50, and the token count of every request of every round."""
    def tps(reqs):
        return sum(r["tokens"] for r in reqs) / (max(r["end"] for r in reqs) - min(r["start"] for r in reqs))

    def ttft(reqs):
        return [1000 * (r["first"] - r["start"]) for r in reqs]

    best = max(rounds, key=tps)
    return {f"agg_tps@{n}": tps(best), f"ttft_p50_ms@{n}": percentile(ttft(best), 50),
            f"ttft_p99_ms@{n}": percentile(ttft(best), 99), f"ttft_mean_ms@{n}": sum(ttft(best)) / len(best),
            f"rounds_tps@{n}": [tps(reqs) for reqs in rounds],
            f"rounds_ttft_p50_ms@{n}": [percentile(ttft(reqs), 50) for reqs in rounds],
            f"completion_tokens@{n}": [r["tokens"] for reqs in rounds for r in reqs]}
