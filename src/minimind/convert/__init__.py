"""Export any checkpoint `load_model` reads to the formats other tools serve.

Library (each returns the written path; a failed export leaves nothing behind):
    export_hf(src, out_dir)             LlamaForCausalLM / Qwen3ForCausalLM / Qwen3MoeForCausalLM / minimind folder
    export_gguf(src, out_path, "f16")   GGUF for stock llama.cpp (f32, f16, bf16, q8_0)
    export_ollama(src, out_dir)         GGUF + Modelfile (TEMPLATE mirrors the chat template)
    export_native(src, out_path)        the original project's fp16 .pth
    export_peft(lora, out_dir, base=b)  a MiniMind LoRA file as a PEFT adapter (vLLM --enable-lora, peft)
    quantize_int8(src, out_dir)         int8 weight-only folder (format: checkpoint/int8.py)
`src` is a path (native .pth, HF folder of any flavour, GGUF, or None for the embedded default model), a loaded
MiniMindForCausalLM (a LoRA attached to it is merged) or a ModelSpec. CLI: `minimind convert` and `minimind quantize`.
"""
from .cli import main, main_quantize
from .gguf_export import export_gguf
from .hf_export import export_hf, quantize_int8
from .native_export import export_native
from .ollama import export_ollama
from .peft_export import export_peft
from .source import ConvertError

__all__ = ["ConvertError", "export_gguf", "export_hf", "export_native", "export_ollama", "export_peft", "main", "main_quantize",
           "quantize_int8"]
