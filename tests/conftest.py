"""Shared test helpers: tiny random models of every era, the path to ../shared, and a server runner (serve) for the
serving tests under each ASGI server."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from pathlib import Path

# Tiny models gain nothing from a second thread, and on a shared 2-core machine every OpenMP region stalls
# while a neighbour holds a core (tests ran 10-25x slower). Subprocesses started by tests inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZERS = SHARED / "minimind-tokenizers"


def tokenizer_dir(era: str) -> Path:
    """Real MiniMind tokenizer folder ('minimind2', 'minimind2-2510', 'minimind-3'); skips when ../shared is absent."""
    path = TOKENIZERS / era
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"../shared/minimind-tokenizers/{era} not found (a fresh clone without ../shared); CI has it")
    return path


def tiny_config(family: str = "minimind2", use_moe: bool = False, **overrides):
    from minimind.config import MiniMindConfig

    base = dict(family=family, vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2 if family == "minimind2" else 4, use_moe=use_moe)
    base.update(overrides)
    return MiniMindConfig(**base)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights around 1) so each code path changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    return model


def tiny_model(family: str = "minimind2", use_moe: bool = False, seed: int = 0, **overrides):
    from minimind.model import MiniMindForCausalLM

    torch.manual_seed(seed)
    return randomize_(MiniMindForCausalLM(tiny_config(family, use_moe, **overrides)), seed).eval()


ERAS = [("minimind2", False), ("minimind2", True), ("minimind3", False), ("minimind3", True)]
ERA_IDS = ["minimind2", "minimind2-moe", "minimind3", "minimind3-moe"]


# ---------------------------------------------------------------- HTTP servers for the serving tests
ASGI_SERVERS = ("uvicorn", "hypercorn")  # the app must work unchanged under any ASGI server


def start_server(app, server: str = "uvicorn", listener: socket.socket | None = None):
    """Start `app` under `server` on 127.0.0.1:<free port> (or on a bound `listener`, which the server then owns)
    in a thread -> (runner, thread, base URL); runner.stop() begins a graceful shutdown (lifespan shutdown
    included, running responses get 30 s), like SIGTERM."""
    if listener is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    else:
        port = listener.getsockname()[1]
    runner = {"uvicorn": _UvicornRunner, "hypercorn": _HypercornRunner}[server](app, port, listener)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not runner.started():
        assert time.monotonic() < deadline and thread.is_alive(), f"{server} did not start"
        time.sleep(0.02)
    return runner, thread, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def serve(app, listener: socket.socket | None = None, server: str = "uvicorn"):
    """start_server() for the duration of a with block; yields the base URL."""
    runner, thread, url = start_server(app, server, listener)
    try:
        yield url
    finally:
        runner.stop()
        thread.join(timeout=30)


class _UvicornRunner:
    def __init__(self, app, port, listener):
        import uvicorn

        self.listener = listener
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    timeout_graceful_shutdown=30))

    def run(self):
        self.server.run(sockets=[self.listener] if self.listener else None)

    def started(self) -> bool:
        return self.server.started

    def stop(self):
        self.server.should_exit = True


class _HypercornRunner:
    def __init__(self, app, port, listener):
        from hypercorn.config import Config

        self.app, self.port, self.loop, self.event, self.ready = app, port, None, None, threading.Event()
        self.config = Config()
        self.config.bind = [f"fd://{listener.fileno()}" if listener else f"127.0.0.1:{port}"]
        self.config.loglevel, self.config.graceful_timeout = "WARNING", 30

    def run(self):
        from hypercorn.asyncio import serve as hypercorn_serve

        async def main():
            self.loop, self.event = asyncio.get_running_loop(), asyncio.Event()
            self.ready.set()
            await hypercorn_serve(self.app, self.config, shutdown_trigger=self.event.wait)

        asyncio.run(main())

    def started(self) -> bool:  # hypercorn binds after the lifespan startup: a connection means both are done
        if not self.ready.is_set():
            return False
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self):
        self.ready.wait(30)
        self.loop.call_soon_threadsafe(self.event.set)
