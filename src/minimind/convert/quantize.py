"""`minimind quantize` / `--dtype int8`: write an int8 weight-only checkpoint folder (format: checkpoint/int8.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.int8 import QUANT_METHOD, quantize_state_dict
from .cli import main_quantize as main  # noqa: F401 - `minimind quantize` runs this module's main
from .output import atomic_output, progress, write_metadata
from .source import load_source


def quantize_int8(src, out_dir, *, tokenizer=None, lora=None, force: bool = False,
                  show_progress: bool = True) -> Path:
    """int8 weight-only folder that `minimind` loads; the tensors kept in float are fp32."""
    from safetensors.torch import save_file

    source = load_source(src, tokenizer=tokenizer, lora=lora)
    quant = {"quant_method": QUANT_METHOD, "bits": 8, "scheme": "symmetric_per_output_channel",
             "scale_dtype": "float32"}
    with atomic_output(out_dir, force, folder=True) as tmp:
        with progress("Quantizing to int8", 2, show_progress) as advance:
            tensors, quantized = quantize_state_dict(source.state_dict, torch.float32)
            advance()
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "quant": QUANT_METHOD})
            advance()
        config_json = {**source.config.to_dict(), "architectures": ["MiniMindForCausalLM"], "model_type": "minimind",
                       "torch_dtype": "float32", "quantization_config": {**quant, "quantized": quantized}}
        write_metadata(tmp, config_json, source)
    return Path(out_dir)
