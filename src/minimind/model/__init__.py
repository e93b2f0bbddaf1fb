"""The MiniMind model: config <- layers/attention/rope <- modeling; LoRA as a wrapper module."""
from .modeling import MiniMindForCausalLM, MiniMindModel, register_auto_classes

register_auto_classes()

__all__ = ["MiniMindForCausalLM", "MiniMindModel", "register_auto_classes"]
