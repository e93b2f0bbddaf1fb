"""`minimind quantize` / `--dtype int8`: write an int8 weight-only checkpoint folder (format: checkpoint/int8.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.int8 import QUANT_METHOD, quantize_state_dict
from .cli import main_quantize as main  # noqa: F401 - `minimind quantize` runs this module's main
from .hf_export import dtype_name, write_metadata
from .source import Source, atomic_output, export_dtype, progress


def export_int8(source: Source, dst: Path, *, dtype=None, force: bool = False, show_progress: bool = True) -> Path:
    """Write the int8 folder; `dtype` is the storage type of the tensors kept in float (default fp32)."""
    from safetensors.torch import save_file

    float_dtype = export_dtype(dtype, torch.float32)
    quant = {"quant_method": QUANT_METHOD, "bits": 8, "scheme": "symmetric_per_output_channel",
             "scale_dtype": "float32"}
    with atomic_output(dst, force, folder=True) as tmp:
        with progress("Quantizing to int8", 2, show_progress) as advance:
            tensors, quantized = quantize_state_dict(source.state_dict, float_dtype)
            advance()
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "quant": QUANT_METHOD})
            advance()
        config_json = {**source.config.to_dict(), "architectures": ["MiniMindForCausalLM"], "model_type": "minimind",
                       "torch_dtype": dtype_name(float_dtype), "quantization_config": {**quant, "quantized": quantized}}
        write_metadata(tmp, config_json, source)
    return Path(dst)
