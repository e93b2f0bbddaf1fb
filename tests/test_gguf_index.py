"""checkpoint/gguf_index.py reads the same metadata and tensors as the `gguf` package's GGUFReader."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from minimind.checkpoint.gguf_index import GGUFIndex
from test_gguf_loading import llama, write_gguf


def _same_as_gguf(path) -> None:
    theirs, ours = gguf.GGUFReader(str(path)), GGUFIndex(path)
    assert [k for k in theirs.fields if not k.startswith("GGUF.")] == list(ours.fields)  # GGUF.*: the header
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        a, b = field.contents(), ours.fields[key].contents()
        assert a == b or (isinstance(a, float) and np.float32(a) == np.float32(b)), key
        if isinstance(a, list) and a:
            assert ours.fields[key].contents(len(a) - 1) == a[-1]
    assert [t.name for t in theirs.tensors] == [t.name for t in ours.tensors]
    for a, b in zip(theirs.tensors, ours.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_fields_and_tensors_equal_gguf_reader(tmp_path, qtype):
    path = write_gguf(tmp_path / "m.gguf", llama(), "llama", gguf.GGMLQuantizationType[qtype])
    _same_as_gguf(path)


def test_default_model_file_equals_gguf_reader():
    from minimind.checkpoint.default_model import find_default_gguf
    from minimind.errors import CheckpointError

    try:
        path = find_default_gguf()
    except CheckpointError as exc:
        pytest.skip(str(exc))
    _same_as_gguf(path)  # a 49,152-token vocabulary and merges: string arrays


def test_truncated_file_is_refused(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", llama(), "llama", gguf.GGMLQuantizationType.Q8_0)
    data = path.read_bytes()
    last = GGUFIndex(path).tensors[-1].span[1]  # the writer may pad after the last tensor
    for cut in (3, 40, len(data) // 3, last - 1):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises((ValueError, OSError)):
            GGUFIndex(tmp_path / "cut.gguf")
