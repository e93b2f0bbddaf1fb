"""The MiniMind model: layers/attention/rope <- core (plain torch, what the engine loads) <- modeling (HF classes).

Names resolve on first access, so importing `minimind.model.core` never pulls in modeling.py and with it
transformers' modeling_utils (~90 MB). Importing modeling.py registers model_type "minimind" with the Auto classes.
"""
from __future__ import annotations

import importlib

_LAZY = {"MiniMindForCausalLM": ".modeling", "MiniMindModel": ".modeling", "register_auto_classes": ".modeling",
         "MiniMindLM": ".core"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
