"""Export any checkpoint `load_model` reads to the formats other tools serve.

Library (each returns the written path; a failed export leaves nothing behind):
    export_hf(src, out_dir)             LlamaForCausalLM / Qwen3ForCausalLM / Qwen3MoeForCausalLM / minimind folder
    export_gguf(src, out_path, "f16")   GGUF for stock llama.cpp (f32, f16, bf16, q8_0)
    export_ollama(src, out_dir)         GGUF + Modelfile (TEMPLATE mirrors the chat template)
    export_native(src, out_path)        the original project's fp16 .pth
    quantize_int8(src, out_dir)         int8 weight-only folder (see quantize.py for the format)
`src` is a path (native .pth, HF folder of any flavour, GGUF, or None for the embedded default model) or a loaded
MiniMindForCausalLM (a LoRA attached to it is merged). CLI: `minimind convert` and `minimind quantize`.
"""
from __future__ import annotations

from pathlib import Path

from . import gguf_export, hf_export, native_export, ollama, quantize
from .cli import main, main_quantize
from .source import ConvertError, load_source

__all__ = ["ConvertError", "export_gguf", "export_hf", "export_native", "export_ollama", "main", "main_quantize",
           "quantize_int8"]


def export_hf(model_or_path, out_dir, *, dtype=None, arch: str | None = None, tokenizer=None, lora=None,
              force: bool = False, show_progress: bool = True) -> Path:
    """HF folder; dtype None/"auto" keeps the source's storage dtype, "int8" writes the int8 format."""
    source = load_source(model_or_path, tokenizer=tokenizer, lora=lora)
    if dtype == "int8":
        return quantize.export_int8(source, out_dir, force=force, show_progress=show_progress)
    return hf_export.export_hf(source, out_dir, dtype=dtype, arch=arch, force=force, show_progress=show_progress)


def export_gguf(model_or_path, out_path, outtype: str = "f16", *, tokenizer=None, lora=None, force: bool = False,
                pre_tokenizer: str | None = None, show_progress: bool = True) -> Path:
    """GGUF file for llama.cpp; outtype is f32, f16, bf16 or q8_0."""
    gguf_export.check_outtype(outtype)  # before the slow load
    source = load_source(model_or_path, tokenizer=tokenizer, lora=lora, need_tokenizer=True)
    return gguf_export.export_gguf(source, out_path, outtype=outtype, force=force, pre_tokenizer=pre_tokenizer,
                                   show_progress=show_progress)


def export_ollama(model_or_path, out_dir, *, outtype: str = "f16", name: str | None = None, tokenizer=None,
                  lora=None, force: bool = False, show_progress: bool = True) -> Path:
    """Ollama folder: model.gguf, a Modelfile and the `ollama create` command in README.txt."""
    gguf_export.check_outtype(outtype)
    source = load_source(model_or_path, tokenizer=tokenizer, lora=lora, need_tokenizer=True)
    return ollama.export_ollama(source, out_dir, outtype=outtype, name=name, force=force,
                                show_progress=show_progress)


def export_native(model_or_path, out_path, *, dtype=None, lora=None, force: bool = False) -> Path:
    """The original project's .pth (fp16 unless dtype says otherwise)."""
    return native_export.export_native(load_source(model_or_path, lora=lora), out_path, dtype=dtype, force=force)


def quantize_int8(model_or_path, out_dir, *, tokenizer=None, lora=None, force: bool = False,
                  show_progress: bool = True) -> Path:
    """int8 weight-only folder that `minimind` loads."""
    source = load_source(model_or_path, tokenizer=tokenizer, lora=lora)
    return quantize.export_int8(source, out_dir, force=force, show_progress=show_progress)
