"""What one request and one connection may cost the server: every limit in one place, each a `minimind serve`
flag. A request past a limit it could never meet gets a 4xx naming the limit (never a 429 "retry")."""
from __future__ import annotations

from dataclasses import dataclass

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 32 * 2**20  # request body; more -> 413 before the body is read
    # prompt characters before tokenizing; None: max_model_len x the longest vocabulary entry (no longer prompt
    # can fit the context), so an oversized prompt costs no tokenization
    max_prompt_chars: int | None = None
    max_stop_strings: int = 16  # `stop` entries per request
    max_stop_chars: int = 256  # characters per stop string (the stream holds back that many)
    tokenizer_workers: int = 2  # threads rendering and tokenizing prompts, off the event loop
    header_timeout: float = 10.0  # seconds a client may take to send its request headers
    max_header_bytes: int = 16 * 2**10  # request line + headers of one request; more -> connection closed
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 1024  # open connections; more get 503
    # Host header names accepted, any port (DNS-rebinding guard; browser requests with an Origin must come from one
    # of them too); None: no check. `minimind serve` sets the loopback names (+ --allowed-hosts) when bound to
    # loopback, and None (or the loopback names + --allowed-hosts, when given) otherwise.
    allowed_hosts: tuple[str, ...] | None = None
