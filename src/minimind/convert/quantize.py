"""`minimind quantize` / `--dtype int8`: write an int8 weight-only checkpoint folder (format: checkpoint/int8.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint.int8 import QUANT_METHOD, quantize_state_dict
from .source import Source, atomic_dir, progress, resolve_export_dtype
from .tokenizer_files import save_tokenizer


def export_int8(source: Source, dst: Path, *, dtype=None, force: bool = False, show_progress: bool = True) -> Path:
    """Write the int8 folder; `dtype` is the storage type of the tensors kept in float (default fp32)."""
    from safetensors.torch import save_file

    from .hf_export import generation_config

    float_dtype = torch.float32 if dtype in (None, "auto") else resolve_export_dtype(dtype, source)
    cfg = source.config.to_dict()
    with atomic_dir(Path(dst), force) as tmp:
        with progress("Quantizing to int8", 2, show_progress) as advance:
            tensors, quantized = quantize_state_dict(source.state_dict, float_dtype)
            advance()
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "quant": QUANT_METHOD})
            advance()
        cfg.update(architectures=["MiniMindForCausalLM"], model_type="minimind",
                   torch_dtype=str(float_dtype).removeprefix("torch."),
                   quantization_config={"quant_method": QUANT_METHOD, "bits": 8,
                                        "scheme": "symmetric_per_output_channel", "scale_dtype": "float32",
                                        "quantized": quantized})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(source.config), indent=2) + "\n")
        if source.tokenizer is not None:
            save_tokenizer(source.tokenizer, tmp)
    return Path(dst)


def main(argv: list[str] | None = None) -> int:
    """`minimind quantize SRC DST` (registered in minimind/cli.py)."""
    from .cli import run_quantize

    return run_quantize(argv)
