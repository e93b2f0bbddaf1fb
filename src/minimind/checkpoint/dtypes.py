"""Torch dtypes by name."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("minimind")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """None -> fp32 on CPU, bf16 on CUDA, fp16 elsewhere (MPS). fp16 on CPU becomes bf16, with a warning."""
    device_type = torch.device(device).type
    if dtype is None or dtype == "auto":
        return torch.float32 if device_type == "cpu" else (torch.bfloat16 if device_type == "cuda" else torch.float16)
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from float32, bfloat16, float16")
        dtype = _DTYPES[dtype.lower()]
    if dtype == torch.float16 and device_type == "cpu":
        log.warning("float16 is slow and poorly supported on CPU: using bfloat16 instead")
        return torch.bfloat16
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}")
    return dtype

