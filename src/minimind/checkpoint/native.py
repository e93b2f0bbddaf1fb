"""Single weights files: MiniMind's native config-less `.pth` state_dicts (`out/{weight}_{hidden}{_moe}.pth`, the
architecture inferred from keys and shapes, never from the name), `.bin` and `.safetensors`."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from . import detect as fmt
from .safetensors_file import read_safetensors


def read_weights_file(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """{name: tensor} of one .pth/.bin or .safetensors file, floating tensors cast to `dtype` (None keeps them)."""
    if fmt.sniff_file(path) == fmt.SAFETENSORS:  # by content; raises on LFS pointers and empty files
        return read_safetensors(path, dtype)  # tensor by tensor, cast as read
    sd = read_torch_file(path)
    for key in list(sd) if dtype is not None else ():  # one at a time: each source tensor is released once cast
        if sd[key].is_floating_point():
            sd[key] = sd[key].to(dtype)
    return sd


def read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle that needs code execution is refused, never run."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(path, "refused to unpickle it: it contains objects other than tensors (a crafted or "
                              f"non-weights pickle). Only plain state_dicts are loaded. ({exc})") from None
    except Exception as exc:  # torch's unpickler raises IndexError/KeyError/RuntimeError/... on garbage
        raise CheckpointError(path, "not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # some trainers wrap it
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and not any(
            isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, "does not contain a state_dict (a dict of name -> tensor)")
    return obj
