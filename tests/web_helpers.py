"""Shared fixtures for the web UI tests: a tiny random MiniMind saved the original way, and test backends."""
from __future__ import annotations

import json
import queue
import time
from dataclasses import replace
from pathlib import Path

import torch

from minimind.web.backend import Backend, EngineBackend

# An answer a random-weight model cannot write: HTML that would run if a UI rendered model output as HTML.
XSS_ANSWER = 'Look: <script>window.__pwned=1</script> and <img src=x onerror="window.__pwned=1"> done'


def save_tiny_model(root: Path) -> Path:
    """Random MiniMindForCausalLM (hidden 64, 2 layers, vocab 6400) as an fp16 state_dict, as the original saves."""
    from minimind import MiniMindConfig, MiniMindForCausalLM

    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=6400, hidden_size=64, num_hidden_layers=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if "embed" in name else 0.15)
    path = root / "full_sft_64.pth"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


class ScriptedBackend(Backend):
    """Fixed answer chunks, for UI-behaviour tests that need known text (a random model's output is noise).

    Records every (messages, settings) it was asked for.
    """

    def __init__(self, chunks=("<think>let me think", "</think>", "Hello <script>window.pwned=1</script> **bold**"),
                 models=()):
        self.chunks, self._models, self.calls = list(chunks), list(models), []

    def models(self):
        return self._models

    def stream(self, messages, settings):
        self.calls.append((messages, settings))
        for c in self.chunks:
            yield c, 1


class SpyBackend(Backend):
    """The real engine backend, recording what each answer was asked with."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def stream(self, messages, settings):
        self.calls.append((messages, settings))
        yield from self.inner.stream(messages, settings)


class HoldingBackend(Backend):
    """The real in-process engine backend, held open after its first `hold_after` deltas until the UI closes it.

    Its engine runs without the background loop, so it advances only while the answer is read (RequestStream
    steps it itself); once held, nothing reads it, so the request stays unfinished for ever unless the backend
    aborts it. A stop test on it therefore cannot pass by the answer ending on its own, and has no race with it.
    Answers are greedy (the UI's temperature is overridden) so the first deltas are the same on every run.
    When the UI closes the stream, what the engine then reports is put on `ended` (and appended as a JSON line to
    `report`, for an app running in another process).
    """

    def __init__(self, model, tokenizer, hold_after: int = 3, report: str | None = None, **llm_kwargs):
        self.inner = EngineBackend(model, tokenizer=tokenizer, **llm_kwargs)
        self.llm = self.inner.llm
        self.llm.shutdown()  # stop the background loop: from now on the reader drives the engine
        self.hold_after, self.report, self.ended = hold_after, report, queue.Queue()

    def stream(self, messages, settings):
        deltas = self.inner.stream(messages, replace(settings, temperature=0.0))
        try:
            for i, item in enumerate(deltas):
                yield item
                if i + 1 >= self.hold_after:
                    break
            while True:  # held: the UI shows an answer still streaming; the engine gets no steps
                time.sleep(0.1)
                yield "", 0
        finally:
            deltas.close()  # EngineBackend's own cleanup, the code under test: aborts an unfinished request
            outs = self.llm.step()  # applies an abort, if one was sent; nothing else steps this engine
            state = {"finish_reasons": [o.outputs[0].finish_reason for o in outs if o.finished],
                     "unfinished": self.llm.has_unfinished(), "free_slots": self.llm.scheduler.slots.num_free,
                     "slots": self.llm.max_num_seqs}
            self.ended.put(state)
            if self.report:
                with open(self.report, "a", encoding="utf-8") as f:
                    f.write(json.dumps(state) + "\n")


def backend_from_spec(spec: dict) -> Backend:
    """A test backend from JSON (how a test hands one to a Streamlit app running in a subprocess)."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "scripted":
        return ScriptedBackend(**spec)
    if kind == "holding":
        return HoldingBackend(**spec)
    raise ValueError(f"unknown test backend {kind!r}")
