"""Which format is this? Decided from file contents (magic bytes, config.json), never from file names."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError

NATIVE, SAFETENSORS, GGUF = "native-pth", "safetensors", "gguf"
HF_MINIMIND, HF_LLAMA, HF_QWEN3, HF_QWEN3_MOE = "hf-minimind", "hf-llama", "hf-qwen3", "hf-qwen3-moe"
HF_QWEN2_MOE = "hf-qwen2-moe"  # MiniMind2 MoE as `convert --arch qwen2_moe` writes it
INT8 = "minimind-int8"  # a `model_type: minimind` folder written by `minimind quantize` (see int8.py)
INT8_QUANT_METHOD = "minimind_int8"
_HF_KINDS = {"minimind": HF_MINIMIND, "llama": HF_LLAMA, "qwen3": HF_QWEN3, "qwen3_moe": HF_QWEN3_MOE,
             "qwen2_moe": HF_QWEN2_MOE}
_LFS = b"version https://git-lfs"


def sniff_file(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise CheckpointError(path, "is empty (0 bytes)")
    if head.startswith(_LFS):
        raise CheckpointError(path, "is a Git LFS pointer, not the weights: run `git lfs pull` in that repository "
                              "(or download the file itself)")
    if head[:4] == b"GGUF":
        return GGUF
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save zip (maybe truncated), or a raw pickle
        return NATIVE
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
        return SAFETENSORS
    raise CheckpointError(path, "is not a model file this tool knows (expected a PyTorch .pth state_dict, "
                          "safetensors, GGUF, or a Hugging Face model folder)")


def corrupt(path: Path, kind: str, why: str) -> CheckpointError:
    return CheckpointError(path, f"unreadable {kind} file ({why}): it is truncated or corrupt; re-download or "
                           "re-export it")


def only_gguf(folder: Path) -> Path | None:
    """The GGUF file of a folder holding exactly one (a folder of llama.cpp weights), else None."""
    ggufs = list(folder.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def detect(path: Path) -> str:
    """One of the format constants above for a file or folder."""
    if not path.exists():
        raise CheckpointError(path, "does not exist: check the path")
    if path.is_file():
        return sniff_file(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        if only_gguf(path):
            return GGUF
        raise CheckpointError(path, "is a folder without config.json: not a Hugging Face model folder (for native "
                              ".pth weights pass the file itself, or --save_dir/--weight)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(cfg_path, f"is not valid JSON ({exc}): re-download or fix it") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(cfg_path, f"is a JSON {type(cfg).__name__}, not an object: a model's config.json is "
                              "{\"model_type\": ..., \"hidden_size\": ..., ...}; re-download or fix it")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in _HF_KINDS:
        raise CheckpointError(cfg_path, f"model_type {model_type!r} is not supported (supported: "
                              f"{', '.join(_HF_KINDS)}): use a MiniMind, Llama or Qwen3 model folder")
    quant = cfg.get("quantization_config")
    if model_type == "minimind" and isinstance(quant, dict) and quant.get("quant_method") == INT8_QUANT_METHOD:
        return INT8
    return _HF_KINDS[model_type]
