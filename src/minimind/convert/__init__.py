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

from .source import ConvertError, load_source

__all__ = ["ConvertError", "export_gguf", "export_hf", "export_native", "export_ollama", "main", "main_quantize",
           "quantize_int8"]


def _source(model_or_path, tokenizer, lora, need_tokenizer=False):
    if model_or_path is None:
        from ..checkpoint.default_model import default_model_dir

        model_or_path = default_model_dir()
    return load_source(model_or_path, tokenizer=tokenizer, lora=lora, need_tokenizer=need_tokenizer)


def export_hf(model_or_path, out_dir, *, dtype=None, arch: str | None = None, tokenizer=None, lora=None,
              force: bool = False, show_progress: bool = True) -> Path:
    """HF folder; dtype None/"auto" keeps the source's storage dtype, "int8" writes the int8 format."""
    source = _source(model_or_path, tokenizer, lora)
    if dtype == "int8":
        from .quantize import export_int8

        return export_int8(source, Path(out_dir), force=force, show_progress=show_progress)
    from .hf_export import export_hf as write

    return write(source, Path(out_dir), dtype=dtype, arch=arch, force=force, show_progress=show_progress)


def export_gguf(model_or_path, out_path, outtype: str = "f16", *, tokenizer=None, lora=None, force: bool = False,
                pre_tokenizer: str | None = None, show_progress: bool = True) -> Path:
    from .gguf_export import OUTTYPES
    from .gguf_export import export_gguf as write

    if outtype not in OUTTYPES:  # before loading anything
        raise ConvertError(f"unknown GGUF outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    source = _source(model_or_path, tokenizer, lora, need_tokenizer=True)
    return write(source, Path(out_path), outtype=outtype, force=force, pre_tokenizer=pre_tokenizer,
                 show_progress=show_progress)


def export_ollama(model_or_path, out_dir, *, outtype: str = "f16", name: str | None = None, tokenizer=None,
                  lora=None, force: bool = False, show_progress: bool = True) -> Path:
    from .ollama import export_ollama as write

    source = _source(model_or_path, tokenizer, lora, need_tokenizer=True)
    return write(source, Path(out_dir), outtype=outtype, name=name, force=force, show_progress=show_progress)


def export_native(model_or_path, out_path, *, dtype=None, lora=None, force: bool = False) -> Path:
    from .native_export import export_native as write

    return write(_source(model_or_path, None, lora), Path(out_path), dtype=dtype, force=force)


def quantize_int8(model_or_path, out_dir, *, tokenizer=None, lora=None, force: bool = False,
                  show_progress: bool = True) -> Path:
    from .quantize import export_int8

    return export_int8(_source(model_or_path, tokenizer, lora), Path(out_dir), force=force,
                       show_progress=show_progress)


def main(argv: list[str] | None = None) -> int:
    from .cli import run_convert

    return run_convert(argv)


def main_quantize(argv: list[str] | None = None) -> int:
    from .cli import run_quantize

    return run_quantize(argv)
