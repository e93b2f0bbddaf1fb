"""GGUF K-quants (Q4_K, Q6_K): the kernels (kernels/qkblock.c, AVX2 and portable builds) checked against the `gguf`
package's own dequantization of random blocks, with activations quantized per 256 values as llama.cpp's Q8_K
(written out here independently); the numpy quantizer (checkpoint/kquants.py) checked by gguf's dequantization."""
from __future__ import annotations

import ctypes
import subprocess

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from minimind.checkpoint.kquants import quantize_k
from minimind.engine import fused
from minimind.engine.fused import block_linear
from minimind.engine.quant import BlockLinear

TYPES = {"Q4_K": 12, "Q6_K": 14}


def random_blocks(ggml_type: int, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes in the block layout, with finite fp16 scales of a sensible size."""
    size = 144 if ggml_type == 12 else 210
    raw = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    if ggml_type == 12:  # fp16 d, dmin at bytes 0-3
        raw[..., 0:4] = rng.uniform(1e-3, 2e-2, size=(rows, cols // 256, 2)).astype(np.float16).view(np.uint8)
    else:  # fp16 d at bytes 208-209
        raw[..., 208:210] = rng.uniform(1e-3, 2e-2, size=(rows, cols // 256, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def q8_k_reference(x: np.ndarray) -> np.ndarray:
    """x as llama.cpp's quantize_row_q8_K_ref hands it to the K-quant dot products: per 256 values, max = the first
    value of largest magnitude, q = min(rint(-127 / max * x), 127), scale 1 / (-127 / max) in fp32."""
    blocks = x.reshape(x.shape[0], -1, 256).astype(np.float32)
    idx = np.abs(blocks).argmax(-1)
    mx = np.take_along_axis(blocks, idx[..., None], -1)
    iscale = np.where(mx != 0, np.float32(-127) / np.where(mx != 0, mx, 1), 0).astype(np.float32)
    q = np.minimum(np.rint(iscale * blocks), 127)
    d = np.where(iscale != 0, np.float32(1) / np.where(iscale != 0, iscale, 1), 0).astype(np.float32)
    return (q * d).reshape(x.shape).astype(np.float64)


def _check(y: np.ndarray, x: np.ndarray, w_ref: np.ndarray) -> None:
    xq = q8_k_reference(x)
    ref = xq @ w_ref.T
    # integer sums are exact; only the fp32 scaling and summation order differ from the float64 reference
    bound = 1e-5 * (np.abs(xq) @ np.abs(w_ref).T) + 1e-6
    assert np.all(np.abs(y - ref) <= bound), np.abs(y - ref).max()


def _check_mode(y: np.ndarray, x: np.ndarray, w_ref: np.ndarray, mode: str) -> None:
    """int8 activations (Q8_K), or fp32 ones ("fp32"; "auto" from 12 rows on): the dequantized matrix's product."""
    if mode == "int8" or (mode == "auto" and x.shape[0] < 12):
        return _check(y, x, w_ref)
    ref = x.astype(np.float64) @ w_ref.T
    assert np.all(np.abs(y - ref) <= 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w_ref).T) + 1e-6)


@pytest.mark.parametrize("mode", ["int8", "auto", "fp32"])
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows_in", [1, 3, 5, 70])  # 1-4: one tile; 70: more than one 64-row prompt pass
def test_k_product_equals_gguf_dequantized(name, rows_in, mode):
    rng = np.random.default_rng(rows_in)
    n, k = 24, 512
    blocks = random_blocks(TYPES[name], n, k, rng)
    lin = BlockLinear(torch.from_numpy(blocks), TYPES[name], k)
    lin.activations = mode
    x = rng.normal(size=(rows_in, k)).astype(np.float32)
    x[0, :256] *= 50  # one loud super-block next to a quiet one: scales are per 256 values
    y = block_linear(lin, torch.from_numpy(x))
    if y is None:
        pytest.skip("the C kernels cannot be built here (no compiler)")
    w_ref = dequantize(blocks, Q(TYPES[name])).astype(np.float64)
    assert w_ref.shape == (n, k)
    _check_mode(y.numpy(), x, w_ref, mode)


@pytest.mark.parametrize("mode,rows_in", [("int8", 3), ("auto", 13), ("fp32", 3)])
def test_mixed_q4_k_q6_k_rows(mode, rows_in):
    """q|k|v of a Q4_K_M file whose v is Q6_K: one matrix, each row read as its own type."""
    rng = np.random.default_rng(7)
    k = 256
    parts = [(12, random_blocks(12, 8, k, rng)), (12, random_blocks(12, 4, k, rng)), (14, random_blocks(14, 4, k, rng))]
    lin = BlockLinear.stack([(t, torch.from_numpy(b)) for t, b in parts], k)
    assert lin.rows == 16 and lin.table is not None
    lin.activations = mode
    x = rng.normal(size=(rows_in, k)).astype(np.float32)
    y = block_linear(lin, torch.from_numpy(x))
    if y is None:
        pytest.skip("the C kernels cannot be built here (no compiler)")
    w_ref = np.concatenate([dequantize(b, Q(t)) for t, b in parts]).astype(np.float64)
    _check_mode(y.numpy(), x, w_ref, mode)
    torch.testing.assert_close(lin.dequantize(), torch.from_numpy(w_ref).float())
    assert BlockLinear.stack([(12, torch.from_numpy(parts[0][1])), (8, torch.zeros(4, 272, dtype=torch.uint8))],
                             k) is None  # Q4_K with Q8_0 rows: different activation formats, not stacked


@pytest.mark.parametrize("flags", [["-mno-avx2", "-mno-f16c"], ["-mavx2", "-mfma", "-mf16c"]], ids=["portable", "avx2"])
def test_other_builds_equal_gguf_dequantized(tmp_path, flags):
    """The kernels as CPUs without AVX2 (portable C) or without AVX-512 (AVX2) build them: built here without
    -march=native, so this machine runs the code paths its own build skips."""
    cc = fused.shutil.which("gcc") or fused.shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    so = tmp_path / "portable.so"
    run = subprocess.run([cc, *[str(fused.KERNELS / s) for s in fused.SOURCES], "-o", str(so), "-O2", *flags,
                          "-fPIC", "-shared", "-fopenmp", "-lm"], check=False, capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"this build failed here: {run.stderr[-300:]}")
    lib = ctypes.CDLL(str(so))
    lib.minimind_linear.argtypes = [ctypes.POINTER(fused.Mat), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_int]
    rng = np.random.default_rng(3)
    for name, code in (("Q4_K", 6), ("Q6_K", 7)):
        blocks = random_blocks(TYPES[name], 12, 512, rng)
        x = rng.normal(size=(5, 512)).astype(np.float32)
        y = np.empty((5, 12), dtype=np.float32)
        mat = fused.Mat(blocks.ctypes.data, None, code, 12, 512)
        assert lib.minimind_linear(ctypes.byref(mat), x.ctypes.data, 5, y.ctypes.data, 1) == 0
        _check(y, x, dequantize(blocks, Q(TYPES[name])).astype(np.float64))
    from gguf.quants import quantize

    from test_qblock import _activation_reference

    for qtype, code in ((Q.Q4_0, 4), (Q.Q5_0, 9)):  # and the 32-value blocks (Q8_0-quantized activations)
        blocks = quantize(rng.normal(size=(12, 96)).astype(np.float32), qtype)
        x = rng.normal(size=(5, 96)).astype(np.float32)
        y = np.empty((5, 12), dtype=np.float32)
        mat = fused.Mat(blocks.ctypes.data, None, code, 12, 96)
        assert lib.minimind_linear(ctypes.byref(mat), x.ctypes.data, 5, y.ctypes.data, 1) == 0
        ref = _activation_reference(x) @ dequantize(blocks, qtype).astype(np.float64).T
        assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    for qtype, code, k in ((Q.Q4_1, 5, 96), (Q.Q8_0, 3, 96), (Q.Q4_K, 6, 512)):  # fp32 activations: widened rows
        blocks = quantize(rng.normal(size=(12, k)).astype(np.float32), qtype) if code != 6 else \
            random_blocks(12, 12, k, rng)
        for rows in (3, 13):
            x = rng.normal(size=(rows, k)).astype(np.float32)
            y = np.empty((rows, 12), dtype=np.float32)
            mat = fused.Mat(blocks.ctypes.data, None, code + 16, 12, k)
            assert lib.minimind_linear(ctypes.byref(mat), x.ctypes.data, rows, y.ctypes.data, 1) == 0
            ref = x.astype(np.float64) @ dequantize(blocks, qtype).astype(np.float64).T
            assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), (qtype, rows)


@pytest.mark.parametrize("name", TYPES)
def test_torch_path_dequantizes_with_gguf(name):
    rng = np.random.default_rng(1)
    blocks = random_blocks(TYPES[name], 6, 256, rng)
    lin = BlockLinear(torch.from_numpy(blocks), TYPES[name], 256)
    lin.packed = False
    x = torch.from_numpy(rng.normal(size=(2, 256)).astype(np.float32))
    ref = torch.from_numpy(dequantize(blocks, Q(TYPES[name])))
    torch.testing.assert_close(lin(x), x @ ref.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.dequantize(torch.tensor([4, 1])), ref[[4, 1]])


@pytest.mark.parametrize("name, rel", [("Q4_K", 0.12), ("Q6_K", 0.03)])
def test_numpy_quantizer_round_trips_through_gguf(name, rel):
    """Our blocks, read back by gguf's dequantize: close to the weights (4.5 / 6.6 bits per weight), and the
    scale search does better than plain rounding to the grid of the block's range."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 512)).astype(np.float32) * 0.05
    w[3] += 0.04  # an offset: Q4_K's mins carry it
    w[5, :7] = 0  # quiet values next to loud ones
    w[6] = 0  # an all-zero row
    blocks = quantize_k(w, TYPES[name])
    assert blocks.shape == (16, 512 // 256 * (144 if name == "Q4_K" else 210)) and blocks.dtype == np.uint8
    back = dequantize(blocks, Q(TYPES[name]))
    assert np.all(back[6] == 0)
    err = np.sqrt(((back - w) ** 2).mean()) / np.sqrt((w ** 2).mean())
    assert err < rel, err
    # plain rounding per 32 (Q4_K, 4 bits with a min) / 16 values (Q6_K, signed 6 bits) as a baseline
    g = w.reshape(-1, 32 if name == "Q4_K" else 16)
    if name == "Q4_K":
        lo, hi = np.minimum(g.min(1, keepdims=True), 0), g.max(1, keepdims=True)
        s = np.where(hi > lo, (hi - lo) / 15, 1)
        plain = np.clip(np.rint((g - lo) / s), 0, 15) * s + lo
    else:
        s = np.abs(g).max(1, keepdims=True) / 31 + 1e-30
        plain = np.clip(np.rint(g / s), -32, 31) * s
    assert err < np.sqrt(((plain.reshape(w.shape) - w) ** 2).mean()) / np.sqrt((w ** 2).mean())


def test_quantizer_refuses_rows_off_the_super_block():
    with pytest.raises(ValueError, match="not a multiple of 256"):
        quantize_k(np.zeros((2, 320), np.float32), 12)
