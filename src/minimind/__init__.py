"""minimind: run MiniMind checkpoints of every release.

Heavy imports (torch, transformers) happen on first attribute access, so `minimind --help` stays instant.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "MiniMindConfig": "minimind.config",
    "MiniMindForCausalLM": "minimind.model",
    "load_model": "minimind.checkpoint.loader",
    "load_tokenizer": "minimind.checkpoint.loader",
    "lora": "minimind.checkpoint.lora",
    "LLM": "minimind.engine",
    "SamplingParams": "minimind.engine",
}

__all__ = [*_LAZY, "__version__"]  # noqa: PLE0604 - the lazy names are strings


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if name == "lora" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minimind' has no attribute {name!r}")
