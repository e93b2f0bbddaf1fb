"""Single weights files: MiniMind's native config-less `.pth` state_dicts (`out/{weight}_{hidden}{_moe}.pth`, the
architecture inferred from keys and shapes, never from the name), `.bin` and `.safetensors`."""
from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError, reason
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
        with warnings.catch_warnings():  # torch warns about a raw pickle's protocol before failing on it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise fmt.corrupt(path, "PyTorch", reason(exc)) from None
        # torch's own text advises weights_only=False, i.e. running the file's code: it is not shown
        raise CheckpointError(path, "refused to unpickle it for safety: it contains code or objects other than "
                              "tensors, and nothing in it was run. Only plain state_dicts of tensors are loaded: use "
                              "weights from a source you trust, saved with torch.save(model.state_dict(), path) "
                              "(or re-download it if it should be one).") from None
    except Exception as exc:  # torch's unpickler raises EOFError/IndexError/RuntimeError/... on damaged files
        raise fmt.corrupt(path, "PyTorch", reason(exc)) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # some trainers wrap it
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and not any(
            isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, "does not contain a state_dict (a dict of name -> tensor): pass the model's "
                              "weights file (e.g. out/full_sft_768.pth)")
    return obj
