"""N concurrent streaming /v1/completions requests against an OpenAI-compatible server, each one timed.

Every request is the same for every server: a token-id prompt, `max_tokens` with `ignore_eos` (so each one
generates exactly that many tokens), plain sampling at `temperature` (top_k/top_p/min_p off), `stream: true`
with `stream_options.include_usage` (the last chunk's usage gives the token count).

The client runs on the machine it measures, so every microsecond it spends is taken from the server. Hence an
asyncio Protocol on one HTTP/1.1 connection per request (`Connection: close`: the response ends when the server
closes it) instead of an HTTP library: on 2 cores httpx's streaming reads cost ~90 us of client CPU per token,
this ~15. Bytes are only counted as they arrive; JSON is parsed once, for the usage chunk. A stream's first
token is its first chunk whose text is not empty (a token that is only part of a UTF-8 character streams as an
empty text).
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from urllib.parse import urlsplit

TEXT = b'"text":"'  # opens a chunk's text; cannot occur inside a JSON string, whose quotes are escaped
EMPTY = b'"text":""'


class _Stream(asyncio.Protocol):
    def __init__(self, request: bytes, done: asyncio.Future):
        self.request, self.done = request, done
        self.first = self.last = None
        self.chunks, self.head, self.tail = 0, b"", b""

    def connection_made(self, transport) -> None:
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.last = time.perf_counter()
        texts = data.count(TEXT) - data.count(EMPTY)
        if texts and self.first is None:
            self.first = self.last
        self.chunks += texts
        if len(self.head) < 4096:  # the status line (and an error's body)
            self.head += data
        self.tail = (self.tail + data)[-4096:]  # the usage chunk and [DONE] come last

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(None)


class StreamClient:
    """One server's clients: `run_round(prompts, ...)` streams one request per prompt, all at once."""

    def __init__(self, base_url: str, model: str):
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        url = urlsplit(base_url)
        self.host, self.port, self.model = url.hostname, url.port or 80, model

    def run_round(self, prompts: list[list[int]], max_tokens: int, temperature: float) -> list[dict]:
        """-> per request: start, first (first text), end (perf_counter seconds), tokens (usage), chunks (with
        text). Raises on an HTTP error or an error event, so a broken server is not reported as a fast one."""
        return self.loop.run_until_complete(self._round(prompts, max_tokens, temperature))

    async def _round(self, prompts: list[list[int]], max_tokens: int, temperature: float) -> list[dict]:
        return await asyncio.gather(*[self._stream(p, max_tokens, temperature) for p in prompts])

    async def _stream(self, prompt: list[int], max_tokens: int, temperature: float) -> dict:
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                           "temperature": temperature, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        request = (f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: "
                   f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        done = self.loop.create_future()
        start = time.perf_counter()
        transport, stream = await self.loop.create_connection(lambda: _Stream(request, done), self.host, self.port)
        await done
        transport.close()
        end = stream.last or time.perf_counter()
        status = stream.head.split(b"\r\n", 1)[0]
        if b" 200 " not in status + b" ":
            raise RuntimeError(f"{status.decode(errors='replace')}: {stream.head[-300:]!r}")
        return {"start": start, "first": stream.first or end, "end": end, "chunks": stream.chunks,
                "tokens": usage_tokens(stream.tail)}

    def close(self) -> None:
        self.loop.close()


def usage_tokens(tail: bytes) -> int | None:
    """completion_tokens of the last SSE event with a usage object, or None; raises on an error event."""
    for line in reversed(tail.split(b"\n")):
        line = line.strip()
        if not line.startswith(b"data:") or line.endswith(b"[DONE]"):
            continue
        try:
            obj = json.loads(line[5:])
        except ValueError:  # cut by the 4 kB window, or a chunk-size line glued on
            continue
        if obj.get("error"):
            raise RuntimeError(f"error event: {obj['error']}")
        if obj.get("usage"):
            return obj["usage"].get("completion_tokens")
    return None


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


def summarize(rounds: list[list[dict]]) -> dict:
    """Rounds of timed requests -> aggregate tokens/s (median round: all tokens / first start to last end),
    TTFT p50/p95 and ITL p50 over every request of every round (ITL: (end - first) / (tokens - 1))."""
    def tokens(r):
        return r["tokens"] if r["tokens"] is not None else r["chunks"]

    tps = [sum(tokens(r) for r in reqs) / (max(r["end"] for r in reqs) - min(r["start"] for r in reqs))
           for reqs in rounds]
    reqs = [r for rr in rounds for r in rr]
    ttft = [1000 * (r["first"] - r["start"]) for r in reqs]
    itl = [1000 * (r["end"] - r["first"]) / (tokens(r) - 1) for r in reqs if tokens(r) > 1]
    return {"tok_s": statistics.median(tps), "rounds_tok_s": tps, "ttft_p50_ms": percentile(ttft, 50),
            "ttft_p95_ms": percentile(ttft, 95), "itl_p50_ms": percentile(itl, 50) if itl else None,
            "tokens": sorted({tokens(r) for r in reqs})}
