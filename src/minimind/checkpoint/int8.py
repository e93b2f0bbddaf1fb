"""The int8 weight-only folder of `minimind quantize` / `convert --dtype int8` (docs/deploy.md): write, read back.

A `model_type: minimind` folder whose config.json has `quantization_config.quant_method = "minimind_int8"`. Each
`*_proj.weight` and an untied lm_head is int8 [out, in] with `X.weight_scale` fp32 [out]: W ~= q * scale[:, None],
scale = max|W_row| / 127. The embedding (which a tied lm_head uses), the norms and the MoE router stay in float.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import MiniMindConfig
from ..errors import CheckpointError
from .detect import INT8_QUANT_METHOD as QUANT_METHOD


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q int8 [out, in], scale fp32 [out])."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_state_dict(sd: dict[str, torch.Tensor], float_dtype=torch.float32) -> tuple[dict, list[str]]:
    out, quantized = {}, []
    for key, value in sd.items():
        if value.dim() == 2 and (key.endswith("_proj.weight") or key == "lm_head.weight"):
            out[key], out[key + "_scale"] = quantize_weight(value)
            quantized.append(key)
        else:
            out[key] = value.to(float_dtype).contiguous().clone()
    return out, quantized


def dequantize_state_dict(sd: dict[str, torch.Tensor], dtype=torch.float32) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if key.endswith(".weight_scale"):
            continue
        scale = sd.get(key + "_scale")
        out[key] = (value.float() * scale[:, None]).to(dtype) if scale is not None else value.to(dtype)
    return out


def read_int8_folder(folder: str | Path, dtype=torch.float32):  # -> (MiniMindConfig, dequantized state_dict)
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / "config.json"
    raw = json.loads(cfg_path.read_text())
    quant = raw.pop("quantization_config", None)
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(cfg_path, f"is not the config of a {QUANT_METHOD} folder")
    raw.pop("model_type", None)
    try:
        config = MiniMindConfig(**raw)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(cfg_path, f"invalid MiniMind config ({exc}): re-download or fix it") from None
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(folder, "has no model.safetensors: re-run `minimind quantize` or copy the whole folder")
    return config, dequantize_state_dict(load_file(str(weights)), dtype)
