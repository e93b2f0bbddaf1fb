"""Fast CPU generation: continuous batching over a preallocated slot KV cache (nano-vllm layout).

config <- model <- engine: the engine imports the model's modules, never the other way round.
"""
from .llm_engine import LLM, RequestStream
from .sampling import SamplingParams
from .sequence import CompletionOutput, RequestOutput

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "RequestStream", "SamplingParams"]
