"""The original's native checkpoints: config-less fp16 `.pth` state_dicts (`out/{weight}_{hidden}{_moe}.pth`).

Everything about the architecture is inferred from key names and tensor shapes; the file name is never used.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError


def read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True; a pickle that needs code execution is refused, never run."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(path, "refused to unpickle it: it contains objects other than tensors "
                              f"(a crafted or non-weights pickle). Only plain state_dicts are loaded. ({exc})") from None
    except Exception as exc:  # torch's unpickler raises IndexError/KeyError/RuntimeError/... on garbage
        raise CheckpointError(path, "not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # some trainers wrap it
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict) and not any(
            isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, "does not contain a state_dict (a dict of name -> tensor)")
    return obj
