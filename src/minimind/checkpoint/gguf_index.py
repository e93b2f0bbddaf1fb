"""A GGUF file's metadata and tensor table, read as the GGUF spec lays them out, with the tensors left in place
(numpy views of the mapped file). `gguf.GGUFReader` builds a numpy view per field part, ~1M of them for a
49k-token vocabulary (5 s); here string arrays are only walked to find their end, and decoded on request."""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
# value type -> struct format of the scalar types (8 strings, 9 arrays)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# tensor types stored as plain numbers (gguf's ReaderTensor does the same); every other type is bytes
PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


class Field:
    def __init__(self, buf, kind: int, value=None, offsets: list[int] | None = None):
        self._buf, self.type, self._value, self._offsets = buf, kind, value, offsets

    def contents(self, index: int | None = None):
        """The value: a scalar, a str, or a list (one item of an array with `index`)."""
        if self._offsets is None:  # a scalar, a string, or a numeric array
            value = self._value.tolist() if isinstance(self._value, np.ndarray) else self._value
            return value if index is None else value[index]
        if index is not None:
            return _string(self._buf, self._offsets[index])[0]
        return [_string(self._buf, o)[0] for o in self._offsets]


class Tensor:
    def __init__(self, name: str, shape: tuple[int, ...], tensor_type, data: np.ndarray, span: tuple[int, int]):
        self.name, self.shape, self.tensor_type, self.data = name, shape, tensor_type, data
        self.span = span  # (start, end) byte offsets in the file


class GGUFIndex:
    """fields: {key: Field}; tensors: [Tensor] in file order, shape in ggml order (innermost first), data a view
    of the file: plain types as numbers in numpy order, block types as uint8 [..., bytes per row]."""

    def __init__(self, path: str | Path):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if buf[:4] != MAGIC:
            raise ValueError("not a GGUF file (magic bytes)")
        version, n_tensors, n_fields = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (readable: 2, 3)")
        at, self.fields = 24, {}
        for _ in range(n_fields):
            key, at = _string(buf, at)
            (kind,), at = struct.unpack_from("<I", buf, at), at + 4
            self.fields[key], at = _value(buf, kind, at)
        infos = []
        for _ in range(n_tensors):
            name, at = _string(buf, at)
            (n_dims,) = struct.unpack_from("<I", buf, at)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, at + 4)
            kind, offset = struct.unpack_from("<IQ", buf, at + 4 + 8 * n_dims)
            infos.append((name, dims, kind, offset))
            at += 4 + 8 * n_dims + 12
        alignment = self.fields["general.alignment"].contents() if "general.alignment" in self.fields else 32
        start = -(-at // alignment) * alignment
        data = np.frombuffer(buf, dtype=np.uint8)
        self.tensors = []
        for name, dims, kind, offset in infos:
            tensor_type = GGMLQuantizationType(kind)
            block, size = GGML_QUANT_SIZES[tensor_type]
            count = int(np.prod(dims))
            n_bytes = count * size // block
            raw = data[start + offset:start + offset + n_bytes]
            if len(raw) != n_bytes:
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            if kind in PLAIN:
                view = raw.view(PLAIN[kind]).reshape(tuple(reversed(dims)))
            else:  # rows of blocks: [*outer dims, bytes per row]
                view = raw.reshape(*reversed(dims[1:]), dims[0] * size // block)
            self.tensors.append(Tensor(name, dims, tensor_type, view, (start + offset, start + offset + n_bytes)))
        self._buf = buf

    def release(self, tensor: Tensor) -> None:
        """Drop the file pages of a tensor that was copied out from this process's memory (they stay in the page
        cache; a later read maps them again): a load then never holds the file and its copy in full at once."""
        start, end = tensor.span
        page = mmap.PAGESIZE
        start -= start % page
        self._buf.madvise(mmap.MADV_DONTNEED, start, min(-(-(end - start) // page) * page, len(self._buf) - start))


def _string(buf, at: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, at)
    end = at + 8 + n
    if end > len(buf):
        raise ValueError("a string runs past the end of the file")
    return bytes(buf[at + 8:end]).decode("utf-8", errors="replace"), end


def _value(buf, kind: int, at: int) -> tuple[Field, int]:
    if kind in SCALARS:
        fmt = "<" + SCALARS[kind]
        return Field(buf, kind, struct.unpack_from(fmt, buf, at)[0]), at + struct.calcsize(fmt)
    if kind == STRING:
        value, at = _string(buf, at)
        return Field(buf, kind, value), at
    if kind != ARRAY:
        raise ValueError(f"unknown GGUF value type {kind}")
    item, n = struct.unpack_from("<IQ", buf, at)
    at += 12
    if item in SCALARS:
        size = struct.calcsize(SCALARS[item])
        values = np.frombuffer(buf, dtype=np.dtype("<" + SCALARS[item]), count=n, offset=at)
        return Field(buf, kind, values), at + n * size
    if item != STRING:
        raise ValueError(f"GGUF arrays of type {item} are not supported")
    offsets = []
    for _ in range(n):  # only the lengths are read: the strings are decoded when asked for
        offsets.append(at)
        at += 8 + struct.unpack_from("<Q", buf, at)[0]
    return Field(buf, kind, offsets=offsets), at
