"""The MiniMind model: config <- layers/attention/rope <- core (plain torch) <- modeling (HF classes); LoRA as a
wrapper module.

Names are resolved on first access: the engine imports `minimind.model.rope` / `.core`, and running this file
must not import modeling.py, which pulls in transformers' modeling_utils (~90 MB). Accessing an HF class
(or importing modeling.py) registers model_type "minimind" with the transformers Auto classes.
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
