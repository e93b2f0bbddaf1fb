"""One chat backend for both web UIs: the in-process engine or any OpenAI-compatible server.

`Backend.stream` yields text deltas; `chat_stream` turns them into the `Reply` snapshots the UIs render.
"""
from __future__ import annotations

import html
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field

from ..text.reply import parse_reply
from ..text.template import pretrain_prompt, render_prompt, stop_token_ids

CONFIG_ENV = "MINIMIND_WEB_CONFIG"  # JSON of BackendConfig, how `minimind web` hands its flags to the UI process


@dataclass
class Settings:  # what the sliders and boxes set, per answer
    system: str = ""
    history_turns: int = 2  # previous (question, answer) pairs sent with the question, 0-10
    temperature: float = 0.85
    top_p: float = 0.85
    max_tokens: int = 512
    model: str | None = None  # API mode: model / LoRA adapter id from /v1/models


# The sliders of both UIs: Settings field -> (UI text key, min, max, step); each starts at the Settings default.
SLIDERS = {"history_turns": ("turns", 0, 10, 1), "temperature": ("temperature", 0.0, 2.0, 0.05),
           "top_p": ("top_p", 0.05, 1.0, 0.05), "max_tokens": ("max_tokens", 1, 4096, 1)}


@dataclass
class Reply:  # a snapshot of the answer so far
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    done: bool = False

    def speed_text(self) -> str:
        per_second = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return f"{self.tokens} tokens · {per_second:.1f} tokens/s"


@dataclass
class BackendConfig:
    model: str | None = None  # checkpoint path; None = the embedded default model
    tokenizer: str | None = None
    lora: str | None = None
    dtype: str | None = None  # "float32" / "bfloat16" / "float16"; None = the loader's default for the device
    open_thinking: bool | None = None  # as `minimind chat --open_thinking`; None = the chat template's default
    pretrain: bool = False  # pretrain weights: bos + the question, never the chat template (as `minimind chat`)
    api_base: str | None = None  # set: thin client of an OpenAI-compatible server
    api_key: str | None = None

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> BackendConfig:
        return cls(**json.loads(os.environ.get(CONFIG_ENV) or "{}"))


def build_messages(history: list[dict], question: str, settings: Settings) -> list[dict]:
    """System prompt + the last `history_turns` (user, assistant) pairs of `history` + the new question."""
    turns = max(0, min(int(settings.history_turns), 10))
    pairs: list[list[dict]] = []
    for m in history:
        if m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
            continue
        if m["role"] == "user" or not pairs:
            pairs.append([])
        pairs[-1].append({"role": m["role"], "content": m["content"]})
    kept = [m for pair in (pairs[-turns:] if turns else []) for m in pair]
    system = [{"role": "system", "content": settings.system}] if settings.system.strip() else []
    return [*system, *kept, {"role": "user", "content": question}]


class Backend:
    """stream() yields (text delta, tokens in this delta) for one answer; closing it early (the UI's stop button,
    a page that went away) must end the answer at its source."""

    pretrain = False  # the UIs say that system prompt and history are not used
    starts_in_think = False  # the prompt opened a <think> block: the reply starts inside the reasoning

    def stream(self, messages: list[dict], settings: Settings) -> Iterator[tuple[str, int]]:
        raise NotImplementedError

    def models(self) -> list[str]:
        return []

    def defaults(self) -> Settings:
        """Where the sliders start."""
        return Settings()

    def close(self) -> None:  # when the UI stops
        pass


class EngineBackend(Backend):  # the in-process engine on a background thread, shared by every browser session
    def __init__(self, model=None, tokenizer=None, lora=None, *, dtype=None, open_thinking=None, pretrain=False,
                 **llm_kwargs):
        from ..engine import LLM

        def build() -> LLM:  # on the engine's own thread, which then runs every step (LLM.launch)
            weights, tok = model, tokenizer
            if lora:
                from ..checkpoint.loader import load_model, load_tokenizer

                weights, tok = load_model(model, lora=lora, dtype=dtype, light=True), load_tokenizer(tokenizer or model)
            return LLM(weights, tokenizer=tok, dtype=dtype, **llm_kwargs)

        self.llm = LLM.launch(build)
        if self.llm.tokenizer is None:  # a chat needs text in and out, not token ids
            self.llm.shutdown()
            raise ValueError(f"{model} has no tokenizer: pass --tokenizer DIR")
        self.open_thinking, self.pretrain = open_thinking, bool(pretrain)
        self.starts_in_think = bool(open_thinking) and not self.pretrain
        # as `minimind chat`: a chat model that opens a new turn (<|im_start|>) has finished its answer
        self._stop_ids = sorted(stop_token_ids(self.llm.tokenizer, self.llm.config))
        self.sampling = self.llm.sampling_defaults

    def defaults(self) -> Settings:  # the model's own sampling defaults (as `minimind chat` uses them)
        return Settings(temperature=self.sampling.temperature, top_p=self.sampling.top_p)

    def prompt(self, messages: list[dict]) -> str:
        return chat_prompt(self.llm.tokenizer, messages, self.pretrain, self.open_thinking)

    def stream(self, messages, settings):
        from ..engine import SamplingParams

        params = SamplingParams(max_tokens=int(settings.max_tokens), temperature=float(settings.temperature),
                                top_p=max(float(settings.top_p), 1e-6), stop_token_ids=self._stop_ids,
                                top_k=self.sampling.top_k, min_p=self.sampling.min_p,
                                repetition_penalty=self.sampling.repetition_penalty)
        with closing(engine_outputs(self.llm, self.prompt(messages), params)) as outputs:
            for o in outputs:
                yield o.delta_text, len(o.delta_token_ids)

    def close(self):
        self.llm.shutdown()


class OpenAIBackend(Backend):  # a thin client of `minimind serve` or any OpenAI-compatible server
    def __init__(self, api_base: str, api_key: str | None = None, open_thinking: bool | None = None):
        from openai import OpenAI

        self.client = OpenAI(base_url=api_base, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none")
        # the server renders the template: ask it the vLLM way, which `minimind serve` reads too
        self.extra_body = {} if open_thinking is None else {"chat_template_kwargs": {"open_thinking": open_thinking}}

    def close(self):
        self.client.close()

    def models(self):
        try:
            return [m.id for m in self.client.models.list().data]
        except Exception:  # noqa: BLE001 - a picker without choices is fine
            return []

    def stream(self, messages, settings):
        model = settings.model or (self.models() or ["default"])[0]
        chunks = self.client.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True},
            temperature=float(settings.temperature), top_p=float(settings.top_p), max_tokens=int(settings.max_tokens),
            extra_body=self.extra_body or None)
        counted = 0
        try:
            for chunk in chunks:
                if chunk.choices:
                    delta = chunk.choices[0].delta
                    text = (getattr(delta, "reasoning_content", None) or "")
                    text = f"<think>{text}</think>" if text else ""  # servers that split reasoning themselves
                    text += delta.content or ""
                    if text:
                        counted += 1
                        yield text, 1  # about a token per chunk, corrected by the usage chunk
                elif chunk.usage is not None:
                    yield "", chunk.usage.completion_tokens - counted
        finally:
            chunks.close()


def chat_prompt(tokenizer, messages: list[dict], pretrain: bool = False, open_thinking: bool | None = None) -> str:
    """The text the model sees (web and `minimind chat` alike): the chat template, or for pretrain weights bos +
    the last question only."""
    if pretrain:
        question = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        return pretrain_prompt(tokenizer, question)
    return render_prompt(tokenizer, messages, open_thinking=open_thinking)


def engine_outputs(llm, prompt, params) -> Iterator:
    """The engine's CompletionOutput updates of one request; closing this early aborts it and frees its slot."""
    stream = llm.stream(prompt, params)
    try:
        for update in stream:
            yield update.outputs[0]
    finally:
        if stream.final is None:
            stream.abort()


def make_backend(config: BackendConfig) -> Backend:
    if config.api_base:
        return OpenAIBackend(config.api_base, config.api_key, open_thinking=config.open_thinking)
    return EngineBackend(config.model, tokenizer=config.tokenizer, lora=config.lora, dtype=config.dtype,
                         open_thinking=config.open_thinking, pretrain=config.pretrain)


def chat_stream(backend: Backend, messages: list[dict], settings: Settings) -> Iterator[Reply]:
    """Reply snapshots while the answer streams; the last one has done=True and the speed. Closing this (a stop
    button) closes the backend's stream at once, not when it is garbage-collected: the slot is freed right away."""
    text, tokens, start = "", 0, time.perf_counter()

    def reply(done: bool = False) -> Reply:
        joined = text.replace("</think><think>", "")  # API reasoning deltas glued back together
        reasoning, content, calls = parse_reply(joined, started_in_think=backend.starts_in_think)
        return Reply(reasoning, content, [c["function"] for c in calls], tokens, time.perf_counter() - start, done)

    with closing(backend.stream(messages, settings)) as deltas:
        for delta, n in deltas:
            text, tokens = text + delta, tokens + n
            yield reply()
    yield reply(done=True)


_CODE = re.compile(r"(```.*?(?:```|$)|`[^`\n]*`)", re.DOTALL)


def escape_html(text: str) -> str:
    """Markdown-safe: HTML outside code spans/blocks is escaped, so `<script>` shows as text, never runs."""
    parts = _CODE.split(text)
    return "".join(p if i % 2 else html.escape(p, quote=False) for i, p in enumerate(parts))
