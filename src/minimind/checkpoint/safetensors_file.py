"""Read a .safetensors file tensor by tensor, casting each to the target dtype as it arrives.

`safetensors.torch.load_file` maps the whole file and copies every tensor out: while it runs, the mapped pages
(the file's size) and the copies are both resident, and a later cast to bf16 adds a third copy. Here each tensor
is read with plain file reads (the page cache is not this process's RSS) into its own buffer and cast at once,
so the peak is the model in its target dtype plus one tensor in the file's dtype. The weights end up in the
process's own memory, not in mapped file pages: the engine's decode step reads those 10-15 % slower.

A layer's q, k, v projections (and its gate, up projections) are read into one allocation, rows stacked in that
order, each tensor a view of it: the engine runs them as one q|k|v (gate|up) matrix (engine/model_runner.py),
which is then a view of the same memory instead of a copy of them.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError
from .detect import corrupt

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_MAX_HEADER = 100 * 2**20  # the format's own limit
# Bytes converted at a time when casting. Below glibc's 128 KB mmap threshold: freeing a larger buffer would raise
# that threshold, after which the weights come from the heap and dropping them later does not return memory.
_CHUNK = 64 * 2**10
# name suffixes of the matrices the engine stacks row-wise into one, in its order
STACKED = ((".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight"),
           (".mlp.gate_proj.weight", ".mlp.up_proj.weight"))


def _corrupt(path: Path, why: str) -> CheckpointError:
    return corrupt(path, "safetensors", why)


def read_header(f, path: Path) -> tuple[int, dict]:
    """(offset of the data section, {name: {dtype, shape, data_offsets}}) without the __metadata__ entry."""
    head = f.read(8)
    if len(head) != 8:
        raise _corrupt(path, "shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", head)
    if size > _MAX_HEADER:
        raise _corrupt(path, f"header length {size} is implausible")
    try:
        header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    return 8 + size, header


def read_safetensors(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """{name: tensor} in file order. dtype: floating tensors are cast to it one at a time (None keeps the file's)."""
    path = Path(path)
    file_size = os.path.getsize(path)
    out: dict[str, torch.Tensor] = {}
    buffers: dict[torch.dtype, torch.Tensor] = {}  # one conversion buffer per source dtype, reused
    with open(path, "rb") as f:
        base, header = read_header(f, path)
        try:
            entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        except (KeyError, TypeError, IndexError):
            raise _corrupt(path, "a header entry has no data_offsets") from None
        checked = {name: _check(path, name, info, base, file_size) for name, info in entries}
        stacked = _stacked(checked, dtype, stacked_groups(checked))
        for name, (src, start, shape) in checked.items():
            count = math.prod(shape)
            cast = dtype is not None and src.is_floating_point and src != dtype
            tensor = stacked.get(name)
            if tensor is None:
                tensor = torch.empty(shape, dtype=dtype if cast else src)
            f.seek(base + start)
            if not cast:
                _read_into(f, tensor, path, name)
            else:  # through a small buffer: no full-size copy in the file's dtype (113 MB for a 49152 x 576 fp32)
                flat = tensor.view(-1)
                step = max(_CHUNK // src.itemsize, 1)
                buf = buffers.setdefault(src, torch.empty(step, dtype=src))
                for lo in range(0, count, step):
                    part = buf[:min(step, count - lo)]
                    _read_into(f, part, path, name)
                    flat[lo:lo + part.numel()].copy_(part)
            out[name] = tensor
    return out


def _check(path: Path, name: str, info: dict, base: int, file_size: int) -> tuple[torch.dtype, int, list[int]]:
    """(dtype in the file, start in the data section, shape) of a header entry whose bytes the file holds."""
    src = _DTYPES.get(info.get("dtype"))
    if src is None:
        raise _corrupt(path, f"tensor `{name}` has unsupported dtype {info.get('dtype')!r}")
    start, end = info["data_offsets"]
    shape = [int(n) for n in info["shape"]]
    if end - start != math.prod(shape) * src.itemsize or base + end > file_size:
        raise _corrupt(path, f"tensor `{name}` needs bytes {start}-{end} of the data section, the file has "
                       f"{file_size - base}")
    return src, start, shape


def stacked_groups(checked: dict) -> list[list[str]]:
    """The complete STACKED groups of matrices of one dtype and one width, each in STACKED order. checked:
    {name: (dtype or format, _, shape)}."""
    groups = []
    for suffixes in STACKED:
        for name in checked:
            if not name.endswith(suffixes[0]):
                continue
            names = [name.removesuffix(suffixes[0]) + suffix for suffix in suffixes]
            parts = [checked.get(n) for n in names]
            if all(p is not None and len(p[2]) == 2 for p in parts) and len({(p[0], p[2][1]) for p in parts}) == 1:
                groups.append(names)
    return groups


def _stacked(checked: dict, dtype: torch.dtype | None, groups: list[list[str]]) -> dict[str, torch.Tensor]:
    """{name: view}: one buffer per group, its members' rows back to back."""
    views = {}
    for names in groups:
        src, width = checked[names[0]][0], checked[names[0]][2][1]
        target = dtype if dtype is not None and src.is_floating_point else src
        rows = [checked[n][2][0] for n in names]
        views.update(zip(names, torch.empty(sum(rows), width, dtype=target).split(rows)))
    return views


def stacked_view(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """These [rows, K] weights stacked as a view when they lie back to back in one storage (read_safetensors
    allocates each STACKED group so), else None (the caller copies them with torch.cat)."""
    first = weights[0].detach()
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for w in weights:
        if (w.dtype != first.dtype or w.dim() != 2 or w.shape[1] != first.shape[1] or not w.is_contiguous()
                or w.untyped_storage().data_ptr() != storage or w.storage_offset() != offset):
            return None
        offset += w.numel()
    return first.as_strided((sum(w.shape[0] for w in weights), first.shape[1]), (first.shape[1], 1))


def _read_into(f, tensor: torch.Tensor, path: Path, name: str) -> None:
    """Fill a contiguous tensor with the next bytes of f (a buffered reader: readinto fills it unless at EOF)."""
    if f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != tensor.numel() * tensor.element_size():
        raise _corrupt(path, f"file ended inside tensor `{name}`")
