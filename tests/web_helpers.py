"""Shared fixtures for the web UI tests: a tiny random MiniMind saved the original way, and a scripted backend."""
from __future__ import annotations

from pathlib import Path

import torch

from minimind.web.backend import Backend


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
