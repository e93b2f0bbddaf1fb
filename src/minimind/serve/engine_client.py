"""AsyncEngine: the bridge between asyncio handlers and the engine's step loop.

One thread owns the model and calls `LLM.step()`; handlers submit token ids through the engine's thread-safe
`add_request` and read their outputs from an OutputCollector (channel.py). After each step the engine thread hands
all of that step's outputs to the event loop with one `loop.call_soon_threadsafe`, whatever the number of streams.
We drive `step()` ourselves because `LLM.start()`'s loop delivers into blocking queues, which an event loop could
only read by parking one thread per request.

The model is built on the thread that later runs every step (EngineThread, or the event loop's thread for
`--engine-loop inline`): libgomp gives each thread that opens parallel regions a team of its own, and a second
team puts more OpenMP threads than CPUs in the process, which makes libgomp pay a futex wake-up at every parallel
region.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from functools import cached_property, lru_cache

from ..engine import LLM, RequestOutput, SamplingParams
from .channel import OutputCollector, RequestHandle
from .errors import APIError

log = logging.getLogger("minimind.serve")


class EngineThread:
    """One thread for everything that computes: `call(build)` loads the model, then the AsyncEngines given this
    thread run their step loop there. A daemon thread (a ThreadPoolExecutor worker is joined at exit): a forced
    shutdown must not hang on a running step loop."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="minimind-engine", daemon=True).start()

    def _run(self) -> None:
        while True:
            future, fn = self._jobs.get()
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - raised to whoever waits on the future
                future.set_exception(exc)

    def submit(self, fn) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn))
        return future

    def call(self, fn, *args):
        return self.submit(lambda: fn(*args)).result()


class AsyncEngine:
    """Wraps an LLM (not started) for one served model id. max_queue bounds waiting requests (429 beyond it).
    thread: the EngineThread that built the LLM (None: one of its own, made at start). inline: step on the event
    loop instead (a task that `start()` creates, so call it inside the loop): a step, then one turn of the loop."""

    def __init__(self, llm: LLM, *, max_queue: int = 256, thread: EngineThread | None = None, inline: bool = False):
        if llm._thread is not None:
            raise ValueError("pass an LLM whose background loop is not started: AsyncEngine drives step() itself")
        if inline and thread is not None:
            raise ValueError("an inline engine steps on the event loop: it takes no EngineThread")
        self.engine_thread, self.inline = thread, inline
        self.llm, self.max_queue = llm, max_queue
        self.tokenizer, self.max_model_len = llm.tokenizer, llm.max_model_len
        # id -> the text of that token alone (what vLLM reports as logprobs' `token`)
        self.token_text = lru_cache(maxsize=65536)(lambda token_id: llm.tokenizer.decode(
            [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        self._streams: dict[str, tuple[OutputCollector, int]] = {}  # request id -> its collector and key
        self._lock = threading.Lock()
        self._wake = threading.Event()  # thread mode: new work or an abort
        self._awake: asyncio.Event | None = None  # inline mode: the same
        self._running: asyncio.Task | Future | None = None  # the step loop
        self._stopping = False
        self.accepting = True
        self.error: BaseException | None = None
        self.step_hooks: list = []  # callables(outputs) run on the engine thread after each step (metrics)

    def _alive(self) -> bool:
        return self._running is not None and not self._running.done()

    def start(self) -> AsyncEngine:
        if self._alive():
            return self
        self._stopping, self.accepting = False, True
        if self.inline:  # must be called on the event loop (the lifespan does)
            self._awake = asyncio.Event()
            self._running = asyncio.get_running_loop().create_task(self._step_task(), name="minimind-engine-steps")
        else:
            self.engine_thread = self.engine_thread or EngineThread()
            self._running = self.engine_thread.submit(self._loop)
        return self

    def _kick(self) -> None:
        """Wake the step loop: new work or an abort. Inline, callers are on the event loop."""
        (self._awake or self._wake).set()

    async def drain(self, timeout: float = 30.0) -> None:
        """Graceful shutdown: refuse new requests, let running ones finish (up to timeout), abort the rest, stop."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._abort_all()
        deadline = time.monotonic() + 5
        while self._streams and self._alive() and time.monotonic() < deadline:  # the aborts come out of a step
            await asyncio.sleep(0.01)
        self.shutdown()

    def shutdown(self) -> None:
        self.accepting, running, self._running = False, self._running, None
        if running is None:
            return
        if self.inline:  # a step never stops half-way (there is no await in it)
            self._stopping = True
            running.cancel()
            return
        self._abort_all()
        deadline = time.monotonic() + 5
        while self._streams and not running.done() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.01)
        self._stopping = True
        self._wake.set()
        try:
            running.result(timeout=10)
        except Exception:  # noqa: BLE001 - a timeout here must not block shutdown
            log.warning("engine loop did not stop within 10 s")

    @property
    def num_active(self) -> int:
        return len(self._streams)

    @property
    def capacity(self) -> int:
        """Engine requests this engine ever holds at once (running + queued); past it a request gets 429."""
        return self.llm.max_num_seqs + self.max_queue

    @cached_property
    def longest_token_chars(self) -> int | None:
        """Characters of the longest vocabulary entry (None without a tokenizer). A token's entry has at least as
        many characters as its text (byte-level entries one per byte), so a text of more than max_model_len times
        this many characters has more than max_model_len tokens."""
        vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else None
        return max(map(len, vocab), default=None) if vocab else None

    def stats(self) -> dict:
        sched, slots = self.llm.scheduler, self.llm.scheduler.slots
        return {"running": len(sched.running), "waiting": len(sched.waiting), "active": len(self._streams),
                "slots_total": slots.num_slots, "slots_free": slots.num_free,
                "kv_usage": 1 - slots.num_free / max(slots.num_slots, 1)}

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
               lora: str | None = None, stream: bool = True, collector: OutputCollector | None = None,
               k: int = 0) -> RequestHandle:
        """stream=False: only the final output is handed over (non-streamed answers). collector: another
        request's, for a response that reads several requests (k tells them apart); default a new one."""
        if not self.accepting:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        capacity = self.capacity
        if len(self._streams) >= capacity:
            raise APIError(429, f"server busy: {len(self._streams)} requests in flight (limit {capacity}); retry later",
                           code="queue_full", headers={"Retry-After": "1"})
        self.start()
        request_id = request_id or uuid.uuid4().hex
        collector = collector or OutputCollector(asyncio.get_running_loop(), final_only=not stream)
        with self._lock:  # registered before the engine can emit anything for it
            self._streams[request_id] = (collector, k)
        try:
            self.llm.add_request(prompt_token_ids, params, request_id, lora=lora)
        except BaseException as exc:
            with self._lock:
                self._streams.pop(request_id, None)
            if isinstance(exc, ValueError):  # the engine's own checks ("stop_token_ids: token id ... outside ...")
                field = str(exc).split(":", 1)[0]
                raise APIError(400, str(exc), param=field if field.isidentifier() else None) from None
            raise
        self._kick()
        return RequestHandle(self, request_id, prompt_token_ids, collector)

    def abort(self, request_id: str) -> None:
        self.llm.abort(request_id)
        self._kick()

    def _abort_all(self) -> None:
        with self._lock:
            pending = list(self._streams)
        for rid in pending:
            self.abort(rid)

    async def _step_task(self) -> None:
        while not self._stopping:
            self._awake.clear()
            if not self.llm.has_unfinished():
                await self._awake.wait()
                continue
            self._step_once()
            await asyncio.sleep(0)

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            if not self.llm.has_unfinished():
                self._wake.wait(0.5)
                continue
            self._step_once()

    def _step_once(self) -> None:
        try:
            outputs = self.llm.step()
            self.error = None
        except BaseException as exc:  # fail the requests in flight, keep serving the next ones
            log.exception("engine step failed")
            self.error = exc
            self._fail_all(exc)
            return
        for hook in self.step_hooks:
            try:
                hook(outputs)
            except Exception:  # metrics must never take the engine down
                log.exception("step hook failed")
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """One wake-up of each event loop per step for all of the step's outputs (not one per request: each costs
        the loop a self-pipe read and a turn)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in outputs:
                rid = out.request_id
                entry = self._streams.pop(rid, None) if out.finished else self._streams.get(rid)
                if entry is not None and (out.finished or not entry[0].final_only):
                    by_loop.setdefault(entry[0].loop, []).append((entry, out))
        for loop, items in by_loop.items():
            if self.inline:  # already on that loop
                _put_all(items)
            else:
                with contextlib.suppress(RuntimeError):  # the loop is closed (shutdown): nobody listens any more
                    loop.call_soon_threadsafe(_put_all, items)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
        for rid, (collector, _) in streams.items():
            self.llm.abort(rid)
            with contextlib.suppress(RuntimeError):
                collector.loop.call_soon_threadsafe(collector.fail, exc)
        try:  # the aborts are applied (and the slots released) at the start of the next step
            self.llm.step()
        except BaseException:
            log.exception("engine cleanup after a failed step also failed")


def _put_all(items: list) -> None:
    for (collector, k), out in items:
        collector.put(k, out)


class AdapterEngine:
    """The served model id of one LoRA adapter: requests go to the shared AsyncEngine (same thread, batches and
    KV cache) tagged with the adapter; every other attribute is the shared engine's."""

    def __init__(self, engine: AsyncEngine, lora: str):
        self.engine, self.lora = engine, lora

    def submit(self, *args, **kwargs) -> RequestHandle:
        return self.engine.submit(*args, lora=self.lora, **kwargs)

    def __getattr__(self, name):
        return getattr(self.engine, name)
